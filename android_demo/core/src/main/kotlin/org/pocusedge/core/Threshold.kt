package org.pocusedge.core

/**
 * Probability -> binary mask. The Python project has one rule (pocus_edge.metrics.MASK_RULE,
 * written into the golden index as "mask_rule"): bone where prob > threshold. Scoring, export
 * parity and the streaming runtime all use it; the golden tests read the rule from the index and
 * probe values at the threshold, so a port that used >= would fail.
 */
enum class MaskRule(val text: String) {
    GREATER("prob > threshold"),
    GREATER_OR_EQUAL("prob >= threshold");

    fun isBone(prob: Float, threshold: Float): Boolean =
        if (this == GREATER) prob > threshold else prob >= threshold

    companion object {
        /** The Python project's rule (pocus_edge.metrics.MASK_RULE), which the app mirrors. */
        val DEFAULT = GREATER

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
