package org.pocusedge.demo

import android.app.Activity
import android.graphics.Bitmap
import android.os.Bundle
import android.util.Log
import android.widget.ImageView
import android.widget.TextView
import org.pocusedge.core.FpsMeter
import org.pocusedge.core.Interpolation
import org.pocusedge.core.LatencyStats
import org.pocusedge.core.Overlay
import org.pocusedge.core.Postprocess
import org.pocusedge.core.Preprocess
import org.pocusedge.core.Threshold
import java.io.FileNotFoundException

/**
 * Frame -> preprocess (core) -> fused ONNX model (ONNX Runtime) -> threshold -> overlay, on a
 * worker thread; the UI thread only shows the bitmap and the live latency/FPS line.
 *
 * The model is assets/fused.onnx (not committed: build it with `pocus-edge export`, see
 * README.md). Without it the app still plays the clip (no mask) so the pipeline can be seen.
 */
class MainActivity : Activity() {
    private lateinit var frameView: ImageView
    private lateinit var statsText: TextView
    private lateinit var statusText: TextView
    @Volatile private var running = false
    private var worker: Thread? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        frameView = findViewById(R.id.frame_view)
        statsText = findViewById(R.id.stats_text)
        statusText = findViewById(R.id.status_text)
    }

    override fun onResume() {
        super.onResume()
        running = true
        worker = Thread({ runLoop() }, "segmentation").also { it.start() }
    }

    override fun onPause() {
        running = false
        worker?.interrupt()
        worker?.join(2000)
        worker = null
        super.onPause()
    }

    private fun loadModel(): FusedModel? = try {
        FusedModel.fromAsset(this, MODEL_ASSET)
    } catch (e: FileNotFoundException) {
        null
    }

    /** Pick the frame source here: the bundled clip, or the probe once its SDK is linked. */
    private fun openSource(): FrameSource = SampleClipSource(this)
    // private fun openSource(): FrameSource = TeleMedProbeSource()

    private fun runLoop() {
        val model = try {
            loadModel()
        } catch (e: Exception) {
            Log.e(TAG, "cannot load the model", e)
            showStatus("cannot load assets/$MODEL_ASSET: ${e.message}")
            null
        }
        val source = try {
            openSource().also { it.start() }
        } catch (e: Exception) {
            showStatus("cannot open the frame source: ${e.message}")
            model?.close()
            return
        }
        showStatus(
            "source: ${source.name}\n" +
                (model?.let { "model: ${it.description}" } ?: "no assets/$MODEL_ASSET: showing frames without a mask")
        )
        val size = model?.imgSize ?: 224
        val interpolation = model?.interpolation ?: Interpolation.DEFAULT
        val preprocessStats = LatencyStats()
        val inferStats = LatencyStats()
        val totalStats = LatencyStats()
        val fps = FpsMeter()
        var bitmap: Bitmap? = null
        try {
            while (running) {
                val frame = source.next() ?: break
                val t0 = System.nanoTime()
                val gray = Preprocess.preprocessGray(frame.image, size, interpolation)
                val t1 = System.nanoTime()
                var mask: ByteArray? = null
                if (model != null) {
                    val prob = model.infer(gray)
                    val t2 = System.nanoTime()
                    inferStats.recordNanos(t2 - t1)
                    // Back to the frame's own resolution (undo pad + resize), then threshold,
                    // exactly as the Python runtime draws its overlay.
                    val frameProb = Postprocess.probabilityToFrame(prob, size, frame.image.width, frame.image.height)
                    mask = Threshold.mask(frameProb, model.threshold, model.maskRule)
                }
                val pixels = Overlay.composite(frame.image, mask ?: ByteArray(frame.image.width * frame.image.height))
                val t3 = System.nanoTime()
                preprocessStats.recordNanos(t1 - t0)
                totalStats.recordNanos(t3 - t0)
                fps.tick(t3)
                val bmp = bitmap?.takeIf { it.width == frame.image.width && it.height == frame.image.height }
                    ?: Bitmap.createBitmap(frame.image.width, frame.image.height, Bitmap.Config.ARGB_8888)
                bitmap = bmp
                val stats = "pre   ${preprocessStats.summary()}\n" +
                    (inferStats.summary()?.let { "infer $it\n" } ?: "") +
                    "total ${totalStats.summary()}\n" +
                    String.format(java.util.Locale.ROOT, "display %.1f FPS, frame #%d", fps.fps(), frame.index)
                runOnUiThread {
                    // A single reused bitmap: set it on the UI thread only.
                    bmp.setPixels(pixels, 0, frame.image.width, 0, 0, frame.image.width, frame.image.height)
                    frameView.setImageBitmap(bmp)
                    frameView.invalidate()
                    statsText.text = stats
                }
            }
        } catch (e: InterruptedException) {
            // onPause: stop quietly.
        } catch (e: Exception) {
            Log.e(TAG, "segmentation loop failed", e)
            showStatus("error: ${e.message}")
        } finally {
            source.close()
            model?.close()
        }
    }

    private fun showStatus(text: String) = runOnUiThread { statusText.text = text }

    companion object {
        private const val TAG = "PocusEdgeDemo"
        const val MODEL_ASSET = "fused.onnx"
    }
}
