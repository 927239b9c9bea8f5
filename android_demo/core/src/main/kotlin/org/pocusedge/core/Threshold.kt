package org.pocusedge.core

/**
 * Probability -> binary mask. The Python streaming runtime (pocus_edge.runtime.pipeline; the
 * golden index's "mask_rule") marks bone where prob >= threshold; pocus_edge.metrics scores with
 * prob > threshold. The two differ only at exactly the threshold, which a parity test does
 * notice, so the rule is read from the golden index instead of assumed.
 */
enum class MaskRule(val text: String) {
    GREATER("prob > threshold"),
    GREATER_OR_EQUAL("prob >= threshold");

    fun isBone(prob: Float, threshold: Float): Boolean =
        if (this == GREATER) prob > threshold else prob >= threshold

    companion object {
        /** The streaming runtime's rule, which the app mirrors. */
        val DEFAULT = GREATER_OR_EQUAL

        fun parse(text: String): MaskRule = values().firstOrNull { it.text == text.trim() }
            ?: throw IllegalArgumentException("unknown mask rule '$text'; expected one of " +
                values().joinToString { "'" + it.text + "'" })
    }
}

object Threshold {
    const val DEFAULT = 0.5f

    /** One byte per pixel: 1 = bone, 0 = background. */
    fun mask(prob: FloatArray, threshold: Float = DEFAULT, rule: MaskRule = MaskRule.DEFAULT): ByteArray {
        val out = ByteArray(prob.size)
        for (i in prob.indices) if (rule.isBone(prob[i], threshold)) out[i] = 1
        return out
    }
}
