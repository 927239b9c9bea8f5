package org.pocusedge.demo

import android.content.Context
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import org.pocusedge.core.GrayImage

/**
 * The bundled sample clip: PNG frames in assets/<folder>/ (sorted by name), played in a loop at
 * [fps]. The frames are 8-bit grayscale; colour PNGs are converted with the same luminance
 * weights as OpenCV's BGR2GRAY (0.299 R + 0.587 G + 0.114 B), which is what the Python side
 * does to colour exports.
 */
class SampleClipSource(
    context: Context,
    private val folder: String = "sample_clip",
    private val fps: Double = 15.0,
    private val loop: Boolean = true
) : FrameSource {
    override val name = "sample clip (assets/$folder)"

    private val frames: List<GrayImage>
    private var index = 0L
    private var nextDue = 0L

    init {
        val names = (context.assets.list(folder) ?: emptyArray()).filter { it.endsWith(".png") }.sorted()
        require(names.isNotEmpty()) { "no PNG frames in assets/$folder" }
        frames = names.map { name ->
            context.assets.open("$folder/$name").use { stream ->
                val bitmap = BitmapFactory.decodeStream(stream, null, BitmapFactory.Options().apply {
                    inPreferredConfig = Bitmap.Config.ARGB_8888
                }) ?: throw IllegalArgumentException("assets/$folder/$name: not a decodable image")
                toGray(bitmap).also { bitmap.recycle() }
            }
        }
    }

    override fun next(): ProbeFrame? {
        if (!loop && index >= frames.size) return null
        // Pace to the clip's frame rate like a probe would deliver frames.
        val now = System.nanoTime()
        if (nextDue > now) Thread.sleep((nextDue - now) / 1_000_000L, ((nextDue - now) % 1_000_000L).toInt())
        nextDue = maxOf(now, nextDue) + (1e9 / fps).toLong()
        val frame = frames[(index % frames.size).toInt()]
        return ProbeFrame(frame, index++, System.nanoTime())
    }

    companion object {
        fun toGray(bitmap: Bitmap): GrayImage {
            val w = bitmap.width
            val h = bitmap.height
            val argb = IntArray(w * h)
            bitmap.getPixels(argb, 0, w, 0, 0, w, h)
            val out = ByteArray(w * h)
            for (i in argb.indices) {
                val p = argb[i]
                val r = (p shr 16) and 0xFF
                val g = (p shr 8) and 0xFF
                val b = p and 0xFF
                // OpenCV's fixed-point BGR2GRAY: (R*4899 + G*9617 + B*1868 + 2^13) >> 14.
                out[i] = ((r * 4899 + g * 9617 + b * 1868 + 8192) shr 14).toByte()
            }
            return GrayImage(w, h, out)
        }
    }
}
