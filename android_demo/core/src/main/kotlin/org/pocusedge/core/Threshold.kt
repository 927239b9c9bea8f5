package org.pocusedge.core

/**
 * Probability -> binary mask. The pipeline (pocus_edge.metrics, golden index "mask_rule") marks
 * bone where prob > threshold, strictly; the rule is read from the golden index or the model
 * card rather than assumed, because >= and > differ exactly on the pixels that matter least
 * visibly and most in a parity test.
 */
enum class MaskRule(val text: String) {
    GREATER("prob > threshold"),
    GREATER_OR_EQUAL("prob >= threshold");

    fun isBone(prob: Float, threshold: Float): Boolean =
        if (this == GREATER) prob > threshold else prob >= threshold

    companion object {
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
