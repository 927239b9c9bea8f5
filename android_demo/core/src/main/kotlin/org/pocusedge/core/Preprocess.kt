package org.pocusedge.core

/**
 * How a square frame is resized to the model's input size. Both are bilinear with half-pixel
 * centres (no antialiasing); they differ only in arithmetic and rounding, which is exactly what
 * golden vectors catch.
 *
 * - [BILINEAR_FLOAT64]: pocus_edge.data.transforms.resize_bilinear (the project's pipeline):
 *   per axis s = clamp((i + 0.5) * n / m - 0.5, 0, n - 1), i0 = floor(s), i1 = min(i0 + 1, n - 1),
 *   w = s - i0; rows first, then columns, in double precision; 8-bit result floor(v + 0.5).
 * - [OPENCV_LINEAR]: cv2.resize(..., INTER_LINEAR) on uint8 as OpenCV computes it: float32
 *   source positions, 11-bit fixed-point weights (INTER_RESIZE_COEF_BITS = 11) rounded half to
 *   even, a horizontal pass into int sums, then the vertical pass
 *   (((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16) + 2) >> 2. Columns outside the image
 *   are clamped with their weight set to (1, 0); rows are not: a row position above the first
 *   (or below the last) row keeps its fractional weight and both taps read the edge row, which
 *   changes the rounding. Verified bit-exact against OpenCV (golden `cv2_*` arrays).
 */
enum class Interpolation(val pythonName: String) {
    BILINEAR_FLOAT64("bilinear-half-pixel-clamped, float64, rows then columns, round-half-up"),
    OPENCV_LINEAR("bilinear-half-pixel (cv2.INTER_LINEAR)");

    companion object {
        /** The mode whose name pocus_edge.data.transforms.INTERPOLATION reports, or null. */
        fun fromPythonName(name: String): Interpolation? = values().firstOrNull { it.pythonName == name }

        /** What the app uses: the project's training/runtime pipeline. */
        val DEFAULT = BILINEAR_FLOAT64
    }
}

/** The Python preprocessing (pocus_edge.data.transforms) in plain Kotlin, no Android classes. */
object Preprocess {
    /** Zero-pad at the bottom and right so height == width; the top-left content stays in place. */
    fun padToSquare(frame: GrayImage): GrayImage {
        if (frame.width == frame.height) return frame
        val side = Math.max(frame.width, frame.height)
        val out = ByteArray(side * side)
        for (y in 0 until frame.height) {
            System.arraycopy(frame.pixels, y * frame.width, out, y * side, frame.width)
        }
        return GrayImage(side, side, out)
    }

    /** Resize to width x height with [interpolation]; the same size returns the input. */
    fun resize(img: GrayImage, width: Int, height: Int, interpolation: Interpolation = Interpolation.DEFAULT): GrayImage {
        require(width >= 1 && height >= 1) { "bad output size ${width}x$height" }
        if (img.width == width && img.height == height) return img
        return when (interpolation) {
            Interpolation.BILINEAR_FLOAT64 -> resizeFloat64(img, width, height)
            Interpolation.OPENCV_LINEAR -> resizeOpenCv(img, width, height)
        }
    }

    /** uint8 HxW -> uint8 size x size (pad, resize): transforms.preprocess_gray. */
    fun preprocessGray(frame: GrayImage, size: Int, interpolation: Interpolation = Interpolation.DEFAULT): GrayImage =
        resize(padToSquare(frame), size, size, interpolation)

    /** uint8 size x size -> float32 (3, size, size) CHW in [0, 1]: gray / 255 repeated 3 times. */
    fun toModelInput(gray: GrayImage): FloatArray {
        val plane = gray.width * gray.height
        val out = FloatArray(3 * plane)
        for (i in 0 until plane) {
            // float32 division, as numpy's uint8 -> float32 / float32(255) does it.
            val v = (gray.pixels[i].toInt() and 0xFF).toFloat() / 255f
            out[i] = v
            out[plane + i] = v
            out[2 * plane + i] = v
        }
        return out
    }

    /** uint8 HxW frame -> float32 (3, size, size): transforms.preprocess_frame. */
    fun preprocessFrame(frame: GrayImage, size: Int, interpolation: Interpolation = Interpolation.DEFAULT): FloatArray =
        toModelInput(preprocessGray(frame, size, interpolation))

    // ---------------------------------------------------------------------------------------

    /** Source taps of one axis for BILINEAR_FLOAT64: (i0, i1, weight of i1). */
    private class Taps(val i0: IntArray, val i1: IntArray, val w: DoubleArray)

    private fun float64Taps(nIn: Int, nOut: Int): Taps {
        val i0 = IntArray(nOut)
        val i1 = IntArray(nOut)
        val w = DoubleArray(nOut)
        val ratio = nIn.toDouble() / nOut.toDouble()
        val last = (nIn - 1).toDouble()
        for (i in 0 until nOut) {
            var pos = (i + 0.5) * ratio - 0.5
            if (pos < 0.0) pos = 0.0
            if (pos > last) pos = last
            val lo = Math.floor(pos).toInt()
            i0[i] = lo
            i1[i] = Math.min(lo + 1, nIn - 1)
            w[i] = pos - lo
        }
        return Taps(i0, i1, w)
    }

    private fun resizeFloat64(img: GrayImage, width: Int, height: Int): GrayImage {
        val ty = float64Taps(img.height, height)
        val tx = float64Taps(img.width, width)
        // Rows first (all source columns), then columns: the same order of operations as numpy,
        // so every double is bit-identical and so is the rounding.
        val rows = DoubleArray(height * img.width)
        for (r in 0 until height) {
            val a = ty.i0[r] * img.width
            val b = ty.i1[r] * img.width
            val wb = ty.w[r]
            val wa = 1.0 - wb
            for (c in 0 until img.width) {
                val va = (img.pixels[a + c].toInt() and 0xFF).toDouble()
                val vb = (img.pixels[b + c].toInt() and 0xFF).toDouble()
                rows[r * img.width + c] = va * wa + vb * wb
            }
        }
        val out = ByteArray(width * height)
        for (r in 0 until height) {
            val base = r * img.width
            for (c in 0 until width) {
                val wb = tx.w[c]
                val v = rows[base + tx.i0[c]] * (1.0 - wb) + rows[base + tx.i1[c]] * wb
                var q = Math.floor(v + 0.5)
                if (q < 0.0) q = 0.0
                if (q > 255.0) q = 255.0
                out[r * width + c] = q.toInt().toByte()
            }
        }
        return GrayImage(width, height, out)
    }

    private const val COEF_BITS = 11
    private const val COEF_SCALE = 1 shl COEF_BITS

    /** OpenCV's per-axis source index and fixed-point weights. */
    private class FixedTaps(val index: IntArray, val w0: IntArray, val w1: IntArray)

    /** OpenCV INTER_LINEAR's source position per output index along one axis: the left tap
     *  and the float32 fraction towards the next one. Positions follow OpenCV (scale from the
     *  inverse ratio in double, half-pixel centres, float32 fraction); with ``clampEdges`` (the
     *  horizontal axis) positions outside the image snap to the edge with fraction 0. Shared by
     *  the uint8 fixed-point path here and the float path of Postprocess. */
    internal class LinearSource(val start: IntArray, val frac: FloatArray)

    internal fun openCvLinearSource(nIn: Int, nOut: Int, clampEdges: Boolean): LinearSource {
        val start = IntArray(nOut)
        val frac = FloatArray(nOut)
        // OpenCV derives the scale from the inverse ratio: 1 / (dst / src), in double.
        val scale = 1.0 / (nOut.toDouble() / nIn.toDouble())
        for (i in 0 until nOut) {
            var f = ((i + 0.5) * scale - 0.5).toFloat()
            var s = Math.floor(f.toDouble()).toInt()
            f -= s.toFloat()
            if (clampEdges) {
                if (s < 0) { f = 0f; s = 0 }
                if (s >= nIn - 1) { f = 0f; s = nIn - 1 }
            }
            start[i] = s
            frac[i] = f
        }
        return LinearSource(start, frac)
    }

    private fun openCvTaps(nIn: Int, nOut: Int, clampEdges: Boolean): FixedTaps {
        val src = openCvLinearSource(nIn, nOut, clampEdges)
        val w0 = IntArray(nOut)
        val w1 = IntArray(nOut)
        for (i in 0 until nOut) {
            val f = src.frac[i]
            // saturate_cast<short>(float): round half to even, like lrint.
            w0[i] = Math.rint(((1f - f) * COEF_SCALE.toFloat()).toDouble()).toInt()
            w1[i] = Math.rint((f * COEF_SCALE.toFloat()).toDouble()).toInt()
        }
        return FixedTaps(src.start, w0, w1)
    }

    private fun clip(v: Int, n: Int): Int = if (v < 0) 0 else if (v >= n) n - 1 else v

    private fun resizeOpenCv(img: GrayImage, width: Int, height: Int): GrayImage {
        val tx = openCvTaps(img.width, width, clampEdges = true)
        val ty = openCvTaps(img.height, height, clampEdges = false)
        // Horizontal pass for every source row (int sums scaled by 2^11).
        val horiz = IntArray(img.height * width)
        for (y in 0 until img.height) {
            val base = y * img.width
            for (c in 0 until width) {
                val s0 = tx.index[c]
                val s1 = clip(s0 + 1, img.width)
                val p0 = img.pixels[base + s0].toInt() and 0xFF
                val p1 = img.pixels[base + s1].toInt() and 0xFF
                horiz[y * width + c] = p0 * tx.w0[c] + p1 * tx.w1[c]
            }
        }
        val out = ByteArray(width * height)
        for (r in 0 until height) {
            val row0 = clip(ty.index[r], img.height) * width
            val row1 = clip(ty.index[r] + 1, img.height) * width
            val b0 = ty.w0[r]
            val b1 = ty.w1[r]
            for (c in 0 until width) {
                val v = (((b0 * (horiz[row0 + c] shr 4)) shr 16) + ((b1 * (horiz[row1 + c] shr 4)) shr 16) + 2) shr 2
                out[r * width + c] = (if (v > 255) 255 else if (v < 0) 0 else v).toByte()
            }
        }
        return GrayImage(width, height, out)
    }
}
