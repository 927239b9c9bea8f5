package org.pocusedge.core

/**
 * Rough JVM timing of the per-frame core work (not a phone measurement):
 *   java -cp build/kotlinc/core-tests.jar org.pocusedge.core.CoreBenchKt [width height size]
 * Prints the median over 200 runs after 50 warm-up runs for each stage.
 */
fun main(args: Array<String>) {
    val width = args.getOrNull(0)?.toInt() ?: 640
    val height = args.getOrNull(1)?.toInt() ?: 480
    val size = args.getOrNull(2)?.toInt() ?: 224
    val rnd = java.util.Random(0)
    val frame = GrayImage(width, height, ByteArray(width * height).also { rnd.nextBytes(it) })
    val prob = FloatArray(size * size) { rnd.nextFloat() }

    fun median(label: String, body: () -> Any) {
        repeat(50) { body() }
        val times = DoubleArray(200)
        for (i in times.indices) {
            val t0 = System.nanoTime()
            body()
            times[i] = (System.nanoTime() - t0) / 1e6
        }
        java.util.Arrays.sort(times)
        println(String.format(java.util.Locale.ROOT, "%-48s median %.3f ms", label, times[times.size / 2]))
    }

    println("frame ${width}x$height -> ${size}x$size, JVM ${System.getProperty("java.version")}")
    for (mode in Interpolation.values()) {
        median("preprocessGray ($mode)") { Preprocess.preprocessGray(frame, size, mode) }
    }
    val gray = Preprocess.preprocessGray(frame, size)
    median("toModelInput (3,S,S) float32") { Preprocess.toModelInput(gray) }
    median("probabilityToFrame + threshold") {
        Threshold.mask(Postprocess.probabilityToFrame(prob, size, width, height), 0.5f)
    }
    val mask = Threshold.mask(Postprocess.probabilityToFrame(prob, size, width, height), 0.5f)
    median("overlay composite (ARGB)") { Overlay.composite(frame, mask) }
}
