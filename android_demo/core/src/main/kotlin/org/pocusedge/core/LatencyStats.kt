package org.pocusedge.core

/** One summary line of the live display and of benchmark notes. */
class LatencySummary(
    val count: Int,
    val meanMs: Double,
    val p50Ms: Double,
    val p95Ms: Double,
    val p99Ms: Double,
    /** Frames per second the measured stage could sustain: 1000 / mean latency. */
    val fps: Double
) {
    override fun toString(): String = String.format(
        java.util.Locale.ROOT,
        "n=%d mean %.1f ms  p50 %.1f  p95 %.1f  p99 %.1f ms  %.1f FPS", count, meanMs, p50Ms, p95Ms, p99Ms, fps
    )
}

/**
 * Latency over a sliding window of the last [window] frames. Percentiles use linear
 * interpolation between order statistics (numpy.percentile's default): rank = p / 100 * (n - 1).
 * Not thread-safe: record and read from the same thread (the app's inference loop).
 */
class LatencyStats(val window: Int = 300) {
    private val samples = DoubleArray(window)
    private var next = 0
    private var filled = 0

    init {
        require(window >= 1) { "window must be >= 1, got $window" }
    }

    val count: Int get() = filled

    fun record(ms: Double) {
        require(!ms.isNaN() && ms >= 0.0) { "latency must be a non-negative number, got $ms" }
        samples[next] = ms
        next = (next + 1) % window
        if (filled < window) filled++
    }

    fun recordNanos(nanos: Long) = record(nanos / 1.0e6)

    fun clear() {
        next = 0
        filled = 0
    }

    fun summary(): LatencySummary? {
        if (filled == 0) return null
        val sorted = samples.copyOf(filled)
        java.util.Arrays.sort(sorted)
        var sum = 0.0
        for (v in sorted) sum += v
        val mean = sum / filled
        return LatencySummary(
            filled, mean,
            percentile(sorted, 50.0), percentile(sorted, 95.0), percentile(sorted, 99.0),
            if (mean > 0.0) 1000.0 / mean else Double.POSITIVE_INFINITY
        )
    }

    companion object {
        /** p-th percentile (0..100) of ascending-sorted values, linear interpolation. */
        fun percentile(sorted: DoubleArray, p: Double): Double {
            require(sorted.isNotEmpty()) { "no samples" }
            require(p in 0.0..100.0) { "percentile $p is outside 0..100" }
            val rank = p / 100.0 * (sorted.size - 1)
            val lo = Math.floor(rank).toInt()
            val hi = Math.min(lo + 1, sorted.size - 1)
            val frac = rank - lo
            val diff = sorted[hi] - sorted[lo]
            // numpy's lerp: from the nearer end, so the result never overshoots either neighbour.
            return if (frac >= 0.5) sorted[hi] - diff * (1.0 - frac) else sorted[lo] + diff * frac
        }
    }
}

/**
 * Wall-clock frame rate of the whole loop (capture + preprocess + inference + drawing) over
 * the last [window] frames: (frames - 1) / (t_last - t_first).
 */
class FpsMeter(val window: Int = 60) {
    private val stamps = LongArray(window)
    private var next = 0
    private var filled = 0

    init {
        require(window >= 2) { "window must be >= 2, got $window" }
    }

    fun tick(nanos: Long) {
        stamps[next] = nanos
        next = (next + 1) % window
        if (filled < window) filled++
    }

    fun fps(): Double {
        if (filled < 2) return 0.0
        val newest = stamps[(next - 1 + window) % window]
        val oldest = stamps[(next - filled + window) % window]
        val span = newest - oldest
        return if (span <= 0L) 0.0 else (filled - 1) * 1.0e9 / span
    }
}
