package org.pocusedge.core

/**
 * Deliberately different interpolations, used only to show that the golden comparison catches a
 * change of interpolation (run the tests with --interpolation nearest or align-corners: the
 * golden tests must fail). Never used by the app.
 */
object WrongResizers {
    /** Nearest neighbour, cv2.INTER_NEAREST style: src = floor(dst * n / m). */
    fun nearest(img: GrayImage, size: Int): GrayImage {
        val out = ByteArray(size * size)
        for (r in 0 until size) {
            val sy = Math.min(Math.floor(r * img.height.toDouble() / size).toInt(), img.height - 1)
            for (c in 0 until size) {
                val sx = Math.min(Math.floor(c * img.width.toDouble() / size).toInt(), img.width - 1)
                out[r * size + c] = img.pixels[sy * img.width + sx]
            }
        }
        return GrayImage(size, size, out)
    }

    /** Bilinear with align_corners=True: src = dst * (n - 1) / (m - 1), corners map to corners. */
    fun alignCorners(img: GrayImage, size: Int): GrayImage {
        fun pos(i: Int, n: Int): Double = if (size == 1) 0.0 else i * (n - 1).toDouble() / (size - 1)
        val out = ByteArray(size * size)
        for (r in 0 until size) {
            val py = pos(r, img.height)
            val y0 = Math.floor(py).toInt()
            val y1 = Math.min(y0 + 1, img.height - 1)
            val wy = py - y0
            for (c in 0 until size) {
                val px = pos(c, img.width)
                val x0 = Math.floor(px).toInt()
                val x1 = Math.min(x0 + 1, img.width - 1)
                val wx = px - x0
                val top = img[x0, y0] * (1 - wx) + img[x1, y0] * wx
                val bottom = img[x0, y1] * (1 - wx) + img[x1, y1] * wx
                out[r * size + c] = Math.floor(top * (1 - wy) + bottom * wy + 0.5).toInt().toByte()
            }
        }
        return GrayImage(size, size, out)
    }

    fun byName(name: String): ((GrayImage, Int) -> GrayImage)? = when (name) {
        "nearest" -> { img, size -> nearest(img, size) }
        "align-corners" -> { img, size -> alignCorners(img, size) }
        else -> null
    }
}
