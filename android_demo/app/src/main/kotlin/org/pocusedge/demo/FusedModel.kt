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
import org.pocusedge.core.Threshold
import java.io.File
import java.io.IOException
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer

/**
 * The fused two-branch segmenter exported by `pocus-edge export` (one ONNX graph: both
 * TransUNets + the confidence-aware fusion), run with ONNX Runtime Mobile.
 *
 * Reads the model card (metadata key "pocus_edge_card") for the input size, threshold and the
 * preprocessing's interpolation; supports both export variants: float32 (1,3,S,S) in [0,1]
 * (the app does pad/resize/scale/repeat) and uint8 (1,1,S,S) (the app pads/resizes, the graph
 * scales and repeats).
 */
class FusedModel(modelPath: File, threads: Int = 4) : AutoCloseable {
    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val session: OrtSession
    private val inputName: String
    val imgSize: Int
    val uint8Input: Boolean
    val threshold: Float
    val maskRule: MaskRule = MaskRule.DEFAULT
    val interpolation: Interpolation
    val description: String

    init {
        val options = OrtSession.SessionOptions().apply {
            setIntraOpNumThreads(threads)
            setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
        }
        // From a file path, not a byte array: the paper-size fused model is ~840 MB in fp32,
        // which must not pass through the Java heap.
        session = env.createSession(modelPath.absolutePath, options)
        inputName = session.inputNames.first()
        val info = session.inputInfo.getValue(inputName).info as TensorInfo
        uint8Input = info.type == OnnxJavaType.UINT8
        val cardJson = session.metadata.customMetadata["pocus_edge_card"]
        val card = cardJson?.let { MiniJson.obj(MiniJson.parse(it), "model card") }
        val shapeSize = info.shape.last()
        imgSize = ((card?.get("img_size") as? Double)?.toInt() ?: shapeSize.toInt()).also {
            require(it > 0) { "model input size unknown (dynamic shape and no model card)" }
        }
        threshold = (card?.get("threshold") as? Double)?.toFloat() ?: Threshold.DEFAULT
        val preprocessing = card?.get("preprocessing") as? Map<*, *>
        val interpolationName = preprocessing?.get("interpolation") as? String
        interpolation = interpolationName?.let { Interpolation.fromPythonName(it) } ?: Interpolation.DEFAULT
        description = "${card?.get("preset") ?: "?"} ${imgSize}x$imgSize " +
            (if (uint8Input) "uint8" else "float32") + " input, ${card?.get("precision") ?: "?"}, " +
            "threshold $threshold" +
            (if (interpolationName != null && Interpolation.fromPythonName(interpolationName) == null)
                " (WARNING: card interpolation '$interpolationName' unknown, using ${interpolation.name})" else "")
    }

    /** Preprocessed gray (imgSize x imgSize) -> fused bone probability, row-major imgSize^2. */
    fun infer(gray: GrayImage): FloatArray {
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
                // Output 0 is the fused probability (N,1,S,S) in every export variant.
                val fused = (result.get(0) as OnnxTensor).floatBuffer
                val out = FloatArray(imgSize * imgSize)
                fused.get(out)
                return out
            }
        }
    }

    override fun close() {
        session.close()
    }

    companion object {
        /**
         * Copy assets/[assetName] to the app's files folder once (ONNX Runtime needs a real file
         * to read or memory-map) and open it. Throws FileNotFoundException when the asset is absent.
         */
        fun fromAsset(context: Context, assetName: String): FusedModel {
            val target = File(context.filesDir, assetName)
            val assetSize = context.assets.openFd(assetName).use { it.length }
            if (!target.isFile || target.length() != assetSize) {
                val partial = File(context.filesDir, "$assetName.partial")
                context.assets.open(assetName).use { input -> partial.outputStream().use { input.copyTo(it, 1 shl 20) } }
                if (!partial.renameTo(target)) throw IOException("cannot move $partial to $target")
            }
            return FusedModel(target)
        }
    }
}
