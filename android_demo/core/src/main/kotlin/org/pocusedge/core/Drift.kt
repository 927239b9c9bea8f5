package org.pocusedge.core

/**
 * The per-frame risk and the drift alarm, ported from the Python runtime
 * (pocus_edge/runtime/drift.py and runtime/risk.py) and checked against its golden vectors.
 *
 * The exported graph's last output "risk" (N,1) is one number per frame that rises when the mask
 * should not be trusted (the two branches disagree, or a student's map is undecided). Its EWMA
 * z_t = lam * r_t + (1 - lam) * z_{t-1}, started at the band's center, raises the alarm when it
 * leaves [center - halfWidth, center + halfWidth] and clears it only once |z - center| <=
 * hysteresis * halfWidth (one alarm per excursion, no flicker). A non-finite risk is counted and
 * leaves z unchanged. Same float64 arithmetic in the same order as Python: bit-identical z.
 */
data class DriftBand(
    val center: Double,
    val halfWidth: Double,
    val lam: Double = DEFAULT_LAMBDA,
    val hysteresis: Double = DEFAULT_HYSTERESIS
) {
    init {
        for ((name, v) in listOf("center" to center, "half_width" to halfWidth, "lam" to lam, "hysteresis" to hysteresis)) {
            require(!v.isNaN() && !v.isInfinite()) { "drift band: $name is not a finite number" }
        }
        require(lam > 0.0 && lam <= 1.0) { "drift band: lambda $lam outside (0, 1]" }
        require(halfWidth > 0.0) { "drift band: half width $halfWidth must be > 0" }
        require(hysteresis >= 0.0 && hysteresis <= 1.0) { "drift band: hysteresis $hysteresis outside [0, 1]" }
    }

    companion object {
        const val DEFAULT_LAMBDA = 0.1
        const val DEFAULT_HYSTERESIS = 0.5

        /** From the card's `risk.drift` object (DriftBand.to_dict() in Python). */
        fun fromMap(d: Map<*, *>): DriftBand {
            fun number(key: String, default: Double?): Double {
                val v = d[key] ?: return default ?: throw IllegalArgumentException("drift band: no '$key'")
                return v as? Double ?: throw IllegalArgumentException("drift band: '$key' is not a number")
            }
            return DriftBand(number("center", null), number("half_width", null),
                number("lam", DEFAULT_LAMBDA), number("hysteresis", DEFAULT_HYSTERESIS))
        }
    }
}

class DriftMonitor(val band: DriftBand) {
    var z: Double = band.center
        private set
    var alarm: Boolean = false
        private set
    var frames: Long = 0
        private set
    var nonfinite: Long = 0
        private set
    /** Alarm intervals [first, last] frame index, as the Python report's alarm_intervals. */
    val intervals: MutableList<LongArray> = ArrayList()

    /** One frame's risk (frames in stream order); returns whether the alarm is on after it. */
    fun update(risk: Double, index: Long = frames): Boolean {
        frames++
        if (risk.isNaN() || risk.isInfinite()) {
            nonfinite++
            return alarm
        }
        z = band.lam * risk + (1.0 - band.lam) * z
        val dev = Math.abs(z - band.center)
        if (!alarm && dev > band.halfWidth) {
            alarm = true
            intervals.add(longArrayOf(index, index))
        } else if (alarm && dev <= band.hysteresis * band.halfWidth) {
            alarm = false
        }
        if (alarm) intervals[intervals.size - 1][1] = index
        return alarm
    }
}

/** The traffic light next to the overlay: green, amber, red (Python: "ok", "high", "alarm"). */
enum class RiskLevel(val pythonName: String, val argb: Int) {
    OK("ok", 0xFF2EB82E.toInt()),
    HIGH("high", 0xFFFFB000.toInt()),
    ALARM("alarm", 0xFFE53935.toInt());

    companion object {
        /** Red while the drift alarm is on; else amber when this frame's risk > threshold; else green. */
        fun of(risk: Double, threshold: Double?, alarm: Boolean): RiskLevel = when {
            alarm -> ALARM
            threshold != null && risk > threshold -> HIGH
            else -> OK
        }

        fun fromPythonName(name: String): RiskLevel = values().firstOrNull { it.pythonName == name }
            ?: throw IllegalArgumentException("unknown risk level '$name'")
    }
}

/**
 * What the model card says about the risk (`risk: {formula, threshold, drift}`, written by
 * `pocus-edge export --risk` with the values `pocus-edge qualify` calibrated). Null fields: not
 * calibrated (no amber without a threshold, no red without a band).
 */
class RiskSettings(val formula: String?, val threshold: Double?, val band: DriftBand?) {
    fun monitor(): DriftMonitor? = band?.let { DriftMonitor(it) }

    companion object {
        /** From the parsed model card; null when the card has no risk entry. */
        fun fromCard(card: Map<*, *>?): RiskSettings? {
            val risk = card?.get("risk") as? Map<*, *> ?: return null
            val threshold = risk["threshold"]?.let {
                (it as? Double)?.takeIf { t -> !t.isNaN() && !t.isInfinite() }
                    ?: throw IllegalArgumentException("risk threshold $it is not a finite number")
            }
            val band = (risk["drift"] as? Map<*, *>)?.let { DriftBand.fromMap(it) }
            return RiskSettings(risk["formula"] as? String, threshold, band)
        }
    }
}

/** Numpy twins of pocus_edge.models.risk, in float64 sums (for checks, and graphs without the output). */
object Risk {
    const val EPS = 1.0

    /** 1 - soft Dice between two maps of the same size. */
    fun branchDisagreement(a: FloatArray, b: FloatArray, eps: Double = EPS): Double {
        require(a.size == b.size) { "maps of ${a.size} and ${b.size} values" }
        var inter = 0.0
        var total = 0.0
        for (i in a.indices) {
            inter += a[i].toDouble() * b[i].toDouble()
            total += a[i].toDouble() + b[i].toDouble()
        }
        return 1.0 - (2.0 * inter + eps) / (total + eps)
    }

    /** 1 - soft Dice between a map and its own mask (prob > threshold). */
    fun selfDisagreement(p: FloatArray, threshold: Float = Threshold.DEFAULT, eps: Double = EPS): Double {
        val hard = FloatArray(p.size) { if (p[it] > threshold) 1f else 0f }
        return branchDisagreement(p, hard, eps)
    }
}
