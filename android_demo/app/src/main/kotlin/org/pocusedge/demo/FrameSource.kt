package org.pocusedge.demo

import org.pocusedge.core.GrayImage

/** One raw probe frame: 8-bit grayscale B-mode pixels, any size (the model pads and resizes). */
class ProbeFrame(val image: GrayImage, val index: Long, val timestampNanos: Long)

/**
 * Where frames come from. The inference loop calls [next] on its own thread; an implementation
 * blocks until a frame is available (pacing a file source, or waiting for the probe) and
 * returns null when the stream has ended. Implementations: [SampleClipSource] (bundled clip,
 * works everywhere), [TeleMedProbeSource] (the place where the TeleMED SDK plugs in).
 */
interface FrameSource : AutoCloseable {
    /** Shown in the status line. */
    val name: String

    /** Start producing frames (connect to the probe, open the file...). */
    fun start() {}

    /** The next frame, waiting for it if needed; null = end of stream. */
    fun next(): ProbeFrame?

    override fun close() {}
}
