package org.pocusedge.core

/**
 * Model-resolution probability (S x S) -> frame resolution (H x W), as the Python runtime does
 * it for display and saved masks (pocus_edge.runtime.overlay.to_frame_resolution): bilinear
 * resize (cv2.INTER_LINEAR on float32) to the padded square side max(H, W), then crop the
 * top-left H x W (drops the bottom/right padding). Threshold the result with Threshold.mask.
 *
 * OpenCV's float path: float32 positions and weights (1 - f, f), columns clamped at the edges
 * with weights (1, 0), rows not clamped (both taps read the edge row), a horizontal pass then
 * a vertical one. OpenCV's SIMD may fuse multiply-adds, so agreement is to ~1e-6, not bit-exact.
 */
object Postprocess {
    private class Taps(val i0: IntArray, val i1: IntArray, val w0: FloatArray, val w1: FloatArray)

    private fun taps(nIn: Int, nOut: Int, clampEdges: Boolean): Taps {
        val src = Preprocess.openCvLinearSource(nIn, nOut, clampEdges)
        val i0 = IntArray(nOut)
        val i1 = IntArray(nOut)
        val w0 = FloatArray(nOut)
        val w1 = FloatArray(nOut)
        for (i in 0 until nOut) {
            i0[i] = clip(src.start[i], nIn)
            i1[i] = clip(src.start[i] + 1, nIn)
            w0[i] = 1f - src.frac[i]
            w1[i] = src.frac[i]
        }
        return Taps(i0, i1, w0, w1)
    }

    private fun clip(v: Int, n: Int): Int = if (v < 0) 0 else if (v >= n) n - 1 else v

    /** Bilinear resize of a float map (row-major, srcSize x srcSize) to out x out. */
    fun resizeSquareMap(map: FloatArray, srcSize: Int, out: Int): FloatArray {
        require(map.size == srcSize * srcSize) { "map has ${map.size} values, expected ${srcSize * srcSize}" }
        if (srcSize == out) return map.copyOf()
        val tx = taps(srcSize, out, clampEdges = true)
        val ty = taps(srcSize, out, clampEdges = false)
        val horiz = FloatArray(srcSize * out)
        for (y in 0 until srcSize) {
            val base = y * srcSize
            for (c in 0 until out) {
                horiz[y * out + c] = map[base + tx.i0[c]] * tx.w0[c] + map[base + tx.i1[c]] * tx.w1[c]
            }
        }
        val result = FloatArray(out * out)
        for (r in 0 until out) {
            val a = ty.i0[r] * out
            val b = ty.i1[r] * out
            val b0 = ty.w0[r]
            val b1 = ty.w1[r]
            for (c in 0 until out) result[r * out + c] = horiz[a + c] * b0 + horiz[b + c] * b1
        }
        return result
    }

    /** (size x size) probability -> (frameHeight x frameWidth), undoing pad + resize. */
    fun probabilityToFrame(prob: FloatArray, size: Int, frameWidth: Int, frameHeight: Int): FloatArray {
        require(frameWidth >= 1 && frameHeight >= 1) { "bad frame size ${frameWidth}x$frameHeight" }
        val side = Math.max(frameWidth, frameHeight)
        val square = resizeSquareMap(prob, size, side)
        val out = FloatArray(frameWidth * frameHeight)
        for (y in 0 until frameHeight) System.arraycopy(square, y * side, out, y * frameWidth, frameWidth)
        return out
    }
}
