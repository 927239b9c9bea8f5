package org.pocusedge.demo

import org.pocusedge.core.DropOldestQueue
import org.pocusedge.core.GrayImage

/**
 * PLACEHOLDER for the TeleMED MicrUs probe (the paper's target domain and deployment device).
 *
 * TeleMED's SDK is distributed to partners by the vendor; it is not public and not part of this
 * project, so nothing here calls it. Everything except the SDK call is in place:
 *
 * 1. Add the SDK's AAR to app/libs/ and `implementation(files("libs/<sdk>.aar"))` to
 *    app/build.gradle.kts (plus the USB permissions/intent filter the SDK documents).
 * 2. In [start], open the probe with the SDK and register a raw B-mode frame callback. In that
 *    callback call [onProbeFrame] with the 8-bit pixels (row-major, width x height), converting
 *    first if the SDK hands out another format (e.g. 16-bit envelope data: scale to 0..255 the
 *    way the training frames were exported; RGB: take luminance).
 * 3. In [close], stop the scan and release the probe.
 *
 * The callback never blocks: frames go into a small drop-oldest queue and the inference loop
 * always takes the newest ones, so a slow phone drops frames instead of falling behind the probe.
 */
class TeleMedProbeSource(queueCapacity: Int = 2) : FrameSource {
    override val name = "TeleMED probe"

    private val queue = DropOldestQueue<ProbeFrame>(queueCapacity)
    private var count = 0L
    @Volatile private var running = false

    /** Frames the inference loop could not keep up with. */
    val droppedFrames: Long get() = queue.dropped

    override fun start() {
        running = true
        // TODO(TeleMED SDK): connect to the probe here and route its frame callback to onProbeFrame.
        throw UnsupportedOperationException(
            "TeleMED SDK is not linked into this build: see TeleMedProbeSource and android_demo/README.md"
        )
    }

    /** Call from the SDK's frame callback (any thread). [pixels] is copied by the caller or owned by us. */
    fun onProbeFrame(pixels: ByteArray, width: Int, height: Int, timestampNanos: Long = System.nanoTime()) {
        if (!running) return
        queue.offer(ProbeFrame(GrayImage(width, height, pixels), count++, timestampNanos))
    }

    override fun next(): ProbeFrame? {
        while (running) {
            val frame = queue.poll(500)
            if (frame != null) return frame
        }
        return null
    }

    override fun close() {
        running = false
        // TODO(TeleMED SDK): stop scanning and release the probe.
    }
}
