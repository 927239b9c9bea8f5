package org.pocusedge.demo

import ai.onnxruntime.OnnxJavaType
import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.TensorInfo
import android.content.Context
import org.pocusedge.core.GrayImage
import org.pocusedge.core.Interpolation
import org.pocusedge.core.MaskRule
import org.pocusedge.core.MiniJson
import org.pocusedge.core.Preprocess
import org.pocusedge.core.RiskSettings
import org.pocusedge.core.Threshold
import java.io.File
import java.io.FileNotFoundException
import java.io.IOException
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer

/**
 * A bone segmenter exported by `pocus-edge export`, run with ONNX Runtime Mobile. Any graph
 * whose first output is the bone probability (1,1,S,S) works: a compact single-network student,
 * or the fused teacher (both TransUNets + the confidence-aware fusion; its extra outputs, when
 * exported with the branch maps, are ignored).
 *
 * Reads the model card (metadata key "pocus_edge_card") for the input size, threshold and the
 * preprocessing's interpolation; supports both input variants: float32 (1,3,S,S) in [0,1]
 * (the app does pad/resize/scale/repeat) and uint8 (1,1,S,S) (the app pads/resizes, the graph
 * scales and repeats). The execution provider follows [preference] (see [openSession]);
 * [provider] says which one runs.
 *
 * A graph exported with its per-frame risk output (`pocus-edge export --risk`: the last output,
 * named "risk", (N,1)) also gives [inferWithRisk] the frame's risk; [risk] holds the card's
 * threshold and drift band for the traffic light (core: RiskSettings, DriftMonitor).
 */
class SegmentationModel(
    modelPath: File,
    preference: ProviderPreference = ProviderPreference.AUTO,
    threads: Int = 4
) : AutoCloseable {
    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val session: OrtSession
    private val inputName: String
    val provider: ActiveProvider
    val imgSize: Int
    val uint8Input: Boolean
    val threshold: Float
    val maskRule: MaskRule = MaskRule.DEFAULT
    val interpolation: Interpolation
    val kind: String
    val description: String
    /** The graph computes the per-frame risk (an output named "risk"). */
    val hasRisk: Boolean
    /** The card's risk entry (threshold, drift band); null when the graph has no risk output. */
    val risk: RiskSettings?

    init {
        // From a file path, not a byte array: the paper-size fused model is ~840 MB in fp32,
        // which must not pass through the Java heap.
        val opened = openSession(env, modelPath.absolutePath, preference, threads)
        session = opened.first
        provider = opened.second
        try {
            inputName = session.inputNames.first()
            val info = session.inputInfo.getValue(inputName).info as TensorInfo
            uint8Input = info.type == OnnxJavaType.UINT8
            val cardJson = session.metadata.customMetadata["pocus_edge_card"]
            val card = cardJson?.let { MiniJson.obj(MiniJson.parse(it), "model card") }
            imgSize = ((card?.get("img_size") as? Double)?.toInt() ?: info.shape.last().toInt()).also {
                require(it > 0) { "model input size unknown (dynamic shape and no model card)" }
            }
            checkProbabilityOutput(imgSize)
            hasRisk = RISK_OUTPUT in session.outputNames
            risk = if (hasRisk) RiskSettings.fromCard(card) ?: RiskSettings(null, null, null) else null
            kind = modelKind(card, session.outputNames.size - (if (hasRisk) 1 else 0))
            threshold = (card?.get("threshold") as? Double)?.toFloat() ?: Threshold.DEFAULT
            val preprocessing = card?.get("preprocessing") as? Map<*, *>
            val interpolationName = preprocessing?.get("interpolation") as? String
            interpolation = interpolationName?.let { Interpolation.fromPythonName(it) } ?: Interpolation.DEFAULT
            description = listOfNotNull(kind, card?.get("preset") as? String, "${imgSize}x$imgSize").joinToString(" ") +
                (if (uint8Input) " uint8" else " float32") + " input, ${card?.get("precision") ?: "?"}, " +
                "threshold $threshold" +
                (if (risk != null) ", risk" + (risk.threshold?.let { " > $it amber" } ?: "") +
                    (if (risk.band != null) ", drift band" else ", no drift band (run pocus-edge qualify)") else "") +
                (if (interpolationName != null && Interpolation.fromPythonName(interpolationName) == null)
                    " (WARNING: card interpolation '$interpolationName' unknown, using ${interpolation.name})" else "")
        } catch (e: Exception) {
            session.close()
            throw e
        }
    }

    /** Output 0 must be one probability channel at the input size (dynamic batch allowed). */
    private fun checkProbabilityOutput(size: Int) {
        val name = session.outputNames.first()
        val info = session.outputInfo.getValue(name).info as? TensorInfo
            ?: throw IllegalArgumentException("model output '$name' is not a tensor")
        val shape = info.shape
        val ok = info.type == OnnxJavaType.FLOAT && shape.size == 4 && shape[1] == 1L &&
            (shape[2] < 0 || shape[2] == size.toLong()) && (shape[3] < 0 || shape[3] == size.toLong())
        require(ok) {
            "model output '$name' is ${info.type} ${shape.contentToString()}; expected a float32 bone " +
                "probability (N,1,$size,$size): is this a pocus-edge segmentation export?"
        }
    }

    /** Preprocessed gray (imgSize x imgSize) -> bone probability, row-major imgSize^2. */
    fun infer(gray: GrayImage): FloatArray = inferWithRisk(gray).first

    /** The bone probability and, when the graph has the risk output, the frame's risk. */
    fun inferWithRisk(gray: GrayImage): Pair<FloatArray, Double?> {
        require(gray.width == imgSize && gray.height == imgSize) { "expected ${imgSize}x$imgSize input" }
        val s = imgSize.toLong()
        val tensor = if (uint8Input) {
            val buffer = ByteBuffer.allocateDirect(imgSize * imgSize).order(ByteOrder.nativeOrder())
            buffer.put(gray.pixels).rewind()
            OnnxTensor.createTensor(env, buffer, longArrayOf(1, 1, s, s), OnnxJavaType.UINT8)
        } else {
            OnnxTensor.createTensor(env, FloatBuffer.wrap(Preprocess.toModelInput(gray)), longArrayOf(1, 3, s, s))
        }
        tensor.use { input ->
            session.run(mapOf(inputName to input)).use { result ->
                // Output 0 is the bone probability (N,1,S,S) in every export (checked at load).
                val probability = (result.get(0) as OnnxTensor).floatBuffer
                val out = FloatArray(imgSize * imgSize)
                probability.get(out)
                val risk = if (hasRisk) {
                    val values = FloatArray(1)
                    (result.get(RISK_OUTPUT).get() as OnnxTensor).floatBuffer.get(values)
                    values[0].toDouble()
                } else null
                return out to risk
            }
        }
    }

    override fun close() {
        session.close()
    }

    companion object {
        /** The name of the per-frame risk output (pocus_edge.card.RISK_OUTPUT_NAME). */
        const val RISK_OUTPUT = "risk"

        /**
         * "student mobilenetv3", "fused teacher" or "model": from the card (a student card names
         * its network; a fused card lists its two branches), else from the output count.
         */
        fun modelKind(card: Map<*, *>?, outputs: Int): String {
            val student = card?.get("student")
            val studentName = when (student) {
                is Map<*, *> -> student["name"] as? String
                is String -> student
                else -> null
            }
            return when {
                studentName != null -> "student $studentName"
                card?.get("kind") == "student" -> "student"
                card?.get("branches") != null || outputs > 1 -> "fused teacher"
                else -> "model"
            }
        }

        /**
         * Open the first of [assetNames] present in assets/ (copied once to the app's files folder:
         * ONNX Runtime needs a real file to read or memory-map). Throws FileNotFoundException
         * when none is there.
         */
        fun fromAssets(
            context: Context,
            assetNames: List<String>,
            preference: ProviderPreference
        ): Pair<String, SegmentationModel> {
            val present = context.assets.list("")?.toSet() ?: emptySet()
            val assetName = assetNames.firstOrNull { it in present }
                ?: throw FileNotFoundException("none of ${assetNames.joinToString()} in assets/")
            val target = File(context.filesDir, assetName)
            val assetSize = context.assets.openFd(assetName).use { it.length }
            if (!target.isFile || target.length() != assetSize) {
                val partial = File(context.filesDir, "$assetName.partial")
                context.assets.open(assetName).use { input -> partial.outputStream().use { input.copyTo(it, 1 shl 20) } }
                if (!partial.renameTo(target)) throw IOException("cannot move $partial to $target")
            }
            return assetName to SegmentationModel(target, preference)
        }
    }
}
