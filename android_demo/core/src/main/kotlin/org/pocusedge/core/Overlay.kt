package org.pocusedge.core

/**
 * Frame + mask -> ARGB pixels for display (android.graphics.Bitmap.setPixels takes exactly
 * this layout, so the app needs no per-pixel code of its own).
 *
 * The fill matches the Python runtime's overlay (pocus_edge.runtime.overlay.render_overlay):
 * mask pixels become gray * (1 - alpha) + colour * alpha per channel, truncated to an integer
 * (numpy's astype(uint8)), default colour RGB (255, 200, 60) at alpha 0.35; other pixels stay
 * gray. The Python overlay also draws the mask's outer contour; this one does not.
 */
object Overlay {
    const val DEFAULT_COLOR = 0x00FFC83C // RGB (255, 200, 60) = the runtime's MASK_BGR (60, 200, 255)
    const val DEFAULT_ALPHA = 0.35

    fun blendChannel(gray: Int, colour: Int, alpha: Double): Int = (gray * (1.0 - alpha) + colour * alpha).toInt()

    /** [mask] has one byte per frame pixel (Threshold.mask of Postprocess.probabilityToFrame); nonzero = bone. */
    fun composite(frame: GrayImage, mask: ByteArray, rgb: Int = DEFAULT_COLOR, alpha: Double = DEFAULT_ALPHA): IntArray {
        require(mask.size == frame.width * frame.height) {
            "mask has ${mask.size} values, frame has ${frame.width * frame.height} pixels"
        }
        require(alpha >= 0.0 && alpha <= 1.0) { "alpha $alpha is outside 0..1" }
        val r = (rgb shr 16) and 0xFF
        val g = (rgb shr 8) and 0xFF
        val b = rgb and 0xFF
        // 256-entry tables: the blend depends only on the gray value.
        val tr = IntArray(256) { blendChannel(it, r, alpha) }
        val tg = IntArray(256) { blendChannel(it, g, alpha) }
        val tb = IntArray(256) { blendChannel(it, b, alpha) }
        val out = IntArray(mask.size)
        for (i in mask.indices) {
            val v = frame.pixels[i].toInt() and 0xFF
            out[i] = if (mask[i].toInt() != 0) argb(tr[v], tg[v], tb[v]) else argb(v, v, v)
        }
        return out
    }

    fun argb(r: Int, g: Int, b: Int): Int = (0xFF shl 24) or (r shl 16) or (g shl 8) or b
}
