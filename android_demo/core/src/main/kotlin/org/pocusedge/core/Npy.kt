package org.pocusedge.core

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * A NumPy .npy array (format 1.x/2.x, C order, little-endian or byte-sized dtypes): the golden
 * vectors' file format. Only what golden files use: |u1 (uint8) and <f4 (float32).
 */
class NpyArray(val dtype: String, val shape: IntArray, private val data: ByteArray) {
    val size: Int get() = shape.fold(1) { a, b -> a * b }

    fun uint8(): ByteArray {
        check(dtype == "|u1" || dtype == "<u1") { "array is $dtype, not uint8" }
        return data
    }

    fun float32(): FloatArray {
        check(dtype == "<f4") { "array is $dtype, not little-endian float32" }
        val out = FloatArray(size)
        ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(out)
        return out
    }

    /** A 2-D uint8 array as an image (shape (H, W)). */
    fun toGrayImage(): GrayImage {
        check(shape.size == 2) { "expected a 2-D array, got shape ${shape.joinToString(",", "(", ")")}" }
        return GrayImage(shape[1], shape[0], uint8())
    }

    companion object {
        private val MAGIC = byteArrayOf(0x93.toByte(), 'N'.toByte(), 'U'.toByte(), 'M'.toByte(), 'P'.toByte(), 'Y'.toByte())
        private val DESCR = Regex("'descr'\\s*:\\s*'([^']+)'")
        private val FORTRAN = Regex("'fortran_order'\\s*:\\s*(True|False)")
        private val SHAPE = Regex("'shape'\\s*:\\s*\\(([^)]*)\\)")

        fun read(file: File): NpyArray = parse(file.readBytes(), file.path)

        fun parse(bytes: ByteArray, name: String = "<bytes>"): NpyArray {
            fun fail(why: String): Nothing = throw IllegalArgumentException("$name: not a readable .npy file ($why)")
            if (bytes.size < 10) fail("too short")
            for (i in MAGIC.indices) if (bytes[i] != MAGIC[i]) fail("bad magic")
            val major = bytes[6].toInt()
            val headerStart: Int
            val headerLen: Int
            if (major == 1) {
                headerLen = (bytes[8].toInt() and 0xFF) or ((bytes[9].toInt() and 0xFF) shl 8)
                headerStart = 10
            } else if (major == 2 || major == 3) {
                if (bytes.size < 12) fail("too short")
                headerLen = ByteBuffer.wrap(bytes, 8, 4).order(ByteOrder.LITTLE_ENDIAN).int
                headerStart = 12
            } else {
                fail("unsupported version $major")
            }
            if (headerStart + headerLen > bytes.size) fail("truncated header")
            val header = String(bytes, headerStart, headerLen, Charsets.ISO_8859_1)
            val descr = DESCR.find(header)?.groupValues?.get(1) ?: fail("no descr")
            if (FORTRAN.find(header)?.groupValues?.get(1) != "False") fail("Fortran order is not supported")
            val shapeText = SHAPE.find(header)?.groupValues?.get(1) ?: fail("no shape")
            val shape = shapeText.split(',').map { it.trim() }.filter { it.isNotEmpty() }.map { it.toInt() }.toIntArray()
            val itemSize = when (descr) {
                "|u1", "<u1", "|i1" -> 1
                "<f4", "<i4" -> 4
                else -> fail("dtype $descr is not supported")
            }
            val count = shape.fold(1) { a, b -> a * b }
            val dataStart = headerStart + headerLen
            if (bytes.size - dataStart != count * itemSize) {
                fail("expected ${count * itemSize} data bytes for shape $shapeText, found ${bytes.size - dataStart}")
            }
            return NpyArray(descr, shape, bytes.copyOfRange(dataStart, bytes.size))
        }
    }
}
