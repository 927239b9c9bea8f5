package org.pocusedge.demo

import android.app.Activity
import android.graphics.Bitmap
import android.os.Bundle
import android.util.Log
import android.view.View
import android.widget.Button
import android.widget.ImageView
import android.widget.TextView
import org.pocusedge.core.FpsMeter
import org.pocusedge.core.Interpolation
import org.pocusedge.core.LatencyStats
import org.pocusedge.core.Overlay
import org.pocusedge.core.Postprocess
import org.pocusedge.core.Preprocess
import org.pocusedge.core.RiskLevel
import org.pocusedge.core.Threshold
import java.io.FileNotFoundException

/**
 * Frame -> preprocess (core) -> segmentation model (ONNX Runtime) -> threshold -> overlay, on a
 * worker thread; the UI thread only shows the bitmap and the live latency/FPS line.
 *
 * The model is the first of [MODEL_ASSETS] found in assets/ (not committed: build it with
 * `pocus-edge export`, see README.md): a compact student (student.onnx) or the fused teacher
 * (fused.onnx). Without one the app still plays the clip (no mask) so the pipeline can be seen.
 * The button cycles the execution provider preference (auto, NNAPI, XNNPACK, CPU); the status
 * line shows the provider that actually runs.
 *
 * A model with the per-frame risk output lights the traffic light next to the overlay: green
 * (risk at or below the card's threshold, no alarm), amber (this frame's risk above it), red
 * (the drift alarm: the risk's EWMA left the band `pocus-edge qualify` calibrated). The EWMA
 * and its hysteresis are the core's DriftMonitor, checked against the Python runtime's golden
 * vectors. Without the output the light stays hidden.
 */
class MainActivity : Activity() {
    private lateinit var frameView: ImageView
    private lateinit var statsText: TextView
    private lateinit var statusText: TextView
    private lateinit var providerButton: Button
    private lateinit var riskLight: TextView
    @Volatile private var running = false
    private var preference = ProviderPreference.AUTO
    private var worker: Thread? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        frameView = findViewById(R.id.frame_view)
        statsText = findViewById(R.id.stats_text)
        statusText = findViewById(R.id.status_text)
        providerButton = findViewById(R.id.provider_button)
        riskLight = findViewById(R.id.risk_light)
        preference = savedInstanceState?.getString(KEY_PROVIDER)
            ?.let { name -> ProviderPreference.values().firstOrNull { it.name == name } } ?: ProviderPreference.AUTO
        showPreference()
        providerButton.setOnClickListener {
            // Reopen the model with the next provider: stop the loop, then start it again.
            preference = preference.next()
            showPreference()
            stopLoop()
            startLoop()
        }
    }

    override fun onSaveInstanceState(outState: Bundle) {
        super.onSaveInstanceState(outState)
        outState.putString(KEY_PROVIDER, preference.name)
    }

    override fun onResume() {
        super.onResume()
        startLoop()
    }

    override fun onPause() {
        stopLoop()
        super.onPause()
    }

    private fun startLoop() {
        running = true
        val chosen = preference
        worker = Thread({ runLoop(chosen) }, "segmentation").also { it.start() }
    }

    private fun stopLoop() {
        running = false
        worker?.interrupt()
        worker?.join(2000)
        worker = null
    }

    private fun showPreference() {
        providerButton.text = getString(R.string.provider_button, preference.label)
    }

    private fun loadModel(chosen: ProviderPreference): Pair<String, SegmentationModel>? = try {
        SegmentationModel.fromAssets(this, MODEL_ASSETS, chosen)
    } catch (e: FileNotFoundException) {
        null
    }

    /** Pick the frame source here: the bundled clip, or the probe once its SDK is linked. */
    private fun openSource(): FrameSource = SampleClipSource(this)
    // private fun openSource(): FrameSource = TeleMedProbeSource()

    private fun runLoop(chosen: ProviderPreference) {
        val loaded = try {
            loadModel(chosen)
        } catch (e: Exception) {
            Log.e(TAG, "cannot load the model", e)
            showStatus("cannot load the model (${MODEL_ASSETS.joinToString(" or ")}): ${e.message}")
            null
        }
        val model = loaded?.second
        val source = try {
            openSource().also { it.start() }
        } catch (e: Exception) {
            showStatus("cannot open the frame source: ${e.message}")
            model?.close()
            return
        }
        showStatus(
            "source: ${source.name}\n" +
                (loaded?.let { (asset, m) -> "model: assets/$asset: ${m.description}\nexecution provider: ${m.provider.summary}" }
                    ?: "no ${MODEL_ASSETS.joinToString(" or ")} in assets/: showing frames without a mask")
        )
        val size = model?.imgSize ?: 224
        val providerName = model?.let { ActiveProvider.shortName(it.provider.provider) } ?: ""
        val interpolation = model?.interpolation ?: Interpolation.DEFAULT
        val preprocessStats = LatencyStats()
        val inferStats = LatencyStats()
        val totalStats = LatencyStats()
        val fps = FpsMeter()
        val riskSettings = model?.risk
        val drift = riskSettings?.monitor()  // one per run: the EWMA starts at the band's center
        runOnUiThread { riskLight.visibility = if (riskSettings != null) View.VISIBLE else View.GONE }
        var bitmap: Bitmap? = null
        try {
            while (running) {
                val frame = source.next() ?: break
                val t0 = System.nanoTime()
                val gray = Preprocess.preprocessGray(frame.image, size, interpolation)
                val t1 = System.nanoTime()
                var mask: ByteArray? = null
                var level: RiskLevel? = null
                var risk: Double? = null
                if (model != null) {
                    val (prob, frameRisk) = model.inferWithRisk(gray)
                    if (frameRisk != null && riskSettings != null) {
                        // One comparison and one EWMA update per frame, as the Python runtime.
                        val alarm = drift?.update(frameRisk, frame.index) ?: false
                        level = RiskLevel.of(frameRisk, riskSettings.threshold, alarm)
                        risk = frameRisk
                    }
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
                    (inferStats.summary()?.let { "infer $it ($providerName)\n" } ?: "") +
                    "total ${totalStats.summary()}\n" +
                    String.format(java.util.Locale.ROOT, "display %.1f FPS, frame #%d", fps.fps(), frame.index)
                val shownLevel = level
                val shownRisk = risk ?: Double.NaN
                runOnUiThread {
                    // A single reused bitmap: set it on the UI thread only.
                    bmp.setPixels(pixels, 0, frame.image.width, 0, 0, frame.image.width, frame.image.height)
                    frameView.setImageBitmap(bmp)
                    frameView.invalidate()
                    statsText.text = stats
                    if (shownLevel != null) {
                        riskLight.setBackgroundColor(shownLevel.argb)
                        riskLight.text = String.format(java.util.Locale.ROOT, "%s\nrisk\n%.3f", lightLabel(shownLevel), shownRisk)
                    }
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

    private fun lightLabel(level: RiskLevel): String = when (level) {
        RiskLevel.OK -> getString(R.string.risk_ok)
        RiskLevel.HIGH -> getString(R.string.risk_high)
        RiskLevel.ALARM -> getString(R.string.risk_alarm)
    }

    companion object {
        private const val TAG = "PocusEdgeDemo"
        private const val KEY_PROVIDER = "execution_provider"

        /** Tried in this order: the compact student first (it runs live on a phone), in ORT format
         *  (what a minimal onnxruntime build reads, README.md) before ONNX. */
        val MODEL_ASSETS = listOf("student.ort", "student.onnx", "fused.onnx")
    }
}
