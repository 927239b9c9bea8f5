package org.pocusedge.core

/**
 * An 8-bit grayscale image, row-major, one byte per pixel (read as unsigned 0..255).
 * The probe delivers frames in this form; the preprocessing works on it directly.
 */
class GrayImage(val width: Int, val height: Int, val pixels: ByteArray) {
    init {
        require(width >= 1 && height >= 1) { "empty image ${width}x$height" }
        require(pixels.size == width * height) {
            "pixel buffer has ${pixels.size} bytes, expected ${width * height} for ${width}x$height"
        }
    }

    /** Unsigned value of pixel (x, y). */
    operator fun get(x: Int, y: Int): Int = pixels[y * width + x].toInt() and 0xFF

    companion object {
        fun blank(width: Int, height: Int): GrayImage = GrayImage(width, height, ByteArray(width * height))

        /** From unsigned values 0..255 (tests, synthetic frames). */
        fun fromInts(width: Int, height: Int, values: IntArray): GrayImage {
            require(values.size == width * height) { "expected ${width * height} values, got ${values.size}" }
            val bytes = ByteArray(values.size)
            for (i in values.indices) {
                val v = values[i]
                require(v in 0..255) { "pixel $i = $v is outside 0..255" }
                bytes[i] = v.toByte()
            }
            return GrayImage(width, height, bytes)
        }
    }
}
