package org.pocusedge.demo

import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtException
import ai.onnxruntime.OrtProvider
import ai.onnxruntime.OrtSession
import ai.onnxruntime.providers.NNAPIFlags
import java.util.EnumSet

/**
 * Which ONNX Runtime execution provider runs the model: Android's NNAPI (the phone's NPU / GPU /
 * DSP drivers), XNNPACK (optimized ARM CPU kernels) or ONNX Runtime's own CPU kernels.
 *
 * The user picks a preference; [openSession] tries the providers it implies in order and always
 * ends with the CPU, so the app runs on every phone. The provider that was actually registered,
 * and whether it took the whole graph, is reported back for the screen.
 */
enum class ProviderPreference(val label: String) {
    AUTO("auto (NNAPI, then XNNPACK, then CPU)"),
    NNAPI("NNAPI"),
    XNNPACK("XNNPACK"),
    CPU("CPU");

    /** Accelerated providers to try, best first; the CPU is always the last resort. */
    fun candidates(): List<OrtProvider> = when (this) {
        AUTO -> listOf(OrtProvider.NNAPI, OrtProvider.XNNPACK)
        NNAPI -> listOf(OrtProvider.NNAPI)
        XNNPACK -> listOf(OrtProvider.XNNPACK)
        CPU -> emptyList()
    }

    fun next(): ProviderPreference = values()[(ordinal + 1) % values().size]
}

/**
 * What runs the model: [provider] plus ONNX Runtime's CPU kernels for operators it does not
 * support, unless [wholeGraph] (every node assigned to [provider]: the session was created with
 * CPU fallback disabled; NNAPI itself may still place nodes on its own CPU driver). [skipped]
 * explains why better providers were not used.
 */
class ActiveProvider(val provider: OrtProvider, val wholeGraph: Boolean, val skipped: List<String>) {
    val summary: String
        get() {
            val name = shortName(provider)
            val coverage = when {
                provider == OrtProvider.CPU -> "ONNX Runtime CPU kernels"
                wholeGraph -> "whole graph"
                else -> "unsupported operators on the CPU"
            }
            val why = if (skipped.isEmpty()) "" else "; " + skipped.joinToString("; ")
            return "$name ($coverage)$why"
        }

    companion object {
        fun shortName(provider: OrtProvider): String = when (provider) {
            OrtProvider.NNAPI -> "NNAPI"
            OrtProvider.XNNPACK -> "XNNPACK"
            OrtProvider.CPU -> "CPU"
            else -> provider.getName()
        }
    }
}

/** Session configuration key: fail session creation instead of running nodes on the CPU. */
private const val DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"

/**
 * Open [modelPath] with the first provider of [preference] that this ONNX Runtime build has and
 * that accepts the model, else on the CPU. Each accelerated provider is tried first for the
 * whole graph (CPU fallback disabled), then with CPU fallback for the operators it lacks.
 */
fun openSession(
    env: OrtEnvironment,
    modelPath: String,
    preference: ProviderPreference,
    threads: Int
): Pair<OrtSession, ActiveProvider> {
    val available = OrtEnvironment.getAvailableProviders()
    val skipped = ArrayList<String>()
    for (provider in preference.candidates()) {
        val name = ActiveProvider.shortName(provider)
        if (provider !in available) {
            skipped.add("$name not in this ONNX Runtime build")
            continue
        }
        for (wholeGraph in listOf(true, false)) {
            val session = try {
                sessionOptions(provider, threads, wholeGraph).use { env.createSession(modelPath, it) }
            } catch (e: OrtException) {
                if (!wholeGraph) skipped.add("$name refused the model: ${e.message?.lineSequence()?.firstOrNull()}")
                null
            }
            if (session != null) return session to ActiveProvider(provider, wholeGraph, skipped)
        }
    }
    val session = sessionOptions(OrtProvider.CPU, threads, wholeGraph = false).use { env.createSession(modelPath, it) }
    return session to ActiveProvider(OrtProvider.CPU, wholeGraph = true, skipped = skipped)
}

private fun sessionOptions(provider: OrtProvider, threads: Int, wholeGraph: Boolean): OrtSession.SessionOptions {
    val options = OrtSession.SessionOptions()
    options.setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
    when (provider) {
        OrtProvider.NNAPI -> {
            // Default flags: fp32 (no USE_FP16 relaxation, so masks match the exported model),
            // NNAPI may use any of its devices.
            options.addNnapi(EnumSet.noneOf(NNAPIFlags::class.java))
            options.setIntraOpNumThreads(threads)
        }
        OrtProvider.XNNPACK -> {
            // XNNPACK has its own thread pool: ONNX Runtime's pool stays at one thread and does not
            // spin, so the two pools do not fight over the cores (ONNX Runtime's recommendation).
            options.addXnnpack(mapOf("intra_op_num_threads" to threads.toString()))
            options.setIntraOpNumThreads(1)
            options.addConfigEntry("session.intra_op.allow_spinning", "0")
        }
        else -> options.setIntraOpNumThreads(threads)
    }
    if (wholeGraph && provider != OrtProvider.CPU) options.addConfigEntry(DISABLE_CPU_FALLBACK, "1")
    return options
}
