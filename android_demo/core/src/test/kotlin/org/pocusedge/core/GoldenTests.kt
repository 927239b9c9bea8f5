package org.pocusedge.core

import java.io.File

/**
 * The Kotlin core against golden vectors written by Python (`pocus-edge golden`):
 * - preprocessed gray (pad + resize): every pixel within 1/255 (1 gray level) of Python, and
 *   the whole set bit-exact;
 * - model input (3, S, S) float32: every value within 1/255 (in practice identical);
 * - the OpenCV mode against cv2.resize itself, bit-exact;
 * - masks from the stored fused probabilities, with the index's threshold and rule: exact;
 * - latency percentiles against numpy.percentile: within 1e-9 ms;
 * - the per-frame risk of a student (self disagreement) recomputed from the stored probability;
 * - the drift alarm: threshold and band read from the probe's model card, then the EWMA (1e-12),
 *   the alarm, the traffic-light level and the alarm intervals of the probe's risk sequence, exactly.
 *
 * [resizeOverride] swaps in a deliberately different interpolation (nearest, align-corners)
 * to show that these comparisons fail when the interpolation changes.
 */
class GoldenTests(private val dir: File, private val resizeOverride: String?) {
    private val label = "golden[" + dir.path + "]"

    private fun npy(name: Any?): NpyArray = NpyArray.read(File(dir, name as String))

    private fun num(value: Any?, what: String): Double =
        (value as? Double) ?: throw IllegalArgumentException("$what: expected a number, got $value")

    fun register(suite: TestSuite) {
        val indexFile = File(dir, "index.json")
        var index: Map<String, Any?> = emptyMap()
        var interpolation: Interpolation? = null
        suite.test("$label index.json is a pocus-edge-golden/1 index with a known interpolation") {
            index = MiniJson.obj(MiniJson.parse(indexFile.readText()), indexFile.path)
            expectEquals("pocus-edge-golden/1", index["format"], "format")
            val name = index["interpolation"] as? String ?: ""
            interpolation = Interpolation.fromPythonName(name)
            expect(interpolation != null) {
                "Python uses interpolation '$name', which the Kotlin core does not implement " +
                    "(known: ${Interpolation.values().joinToString { "'" + it.pythonName + "'" }})"
            }
        }
        val interp = interpolation ?: return
        val wrong = if (resizeOverride != null) WrongResizers.byName(resizeOverride) else null

        fun kotlinGray(frame: GrayImage, size: Int, mode: Interpolation): GrayImage {
            val square = Preprocess.padToSquare(frame)
            if (wrong != null && square.width != size) return wrong(square, size)
            return Preprocess.resize(square, size, size, mode)
        }

        var grayPixels = 0L
        var grayMismatches = 0L
        val cases = MiniJson.list(index["cases"], "cases")
        expectNonEmpty(suite, cases)
        for (caseAny in cases) {
            val case = MiniJson.obj(caseAny, "case")
            val id = num(case["id"], "id").toInt()
            val frame = npy(case["frame"]).toGrayImage()
            for (entryAny in MiniJson.list(case["sizes"], "sizes")) {
                val entry = MiniJson.obj(entryAny, "size entry")
                val size = num(entry["size"], "size").toInt()
                val tag = "$label frame $id (${frame.height}x${frame.width}) -> $size"
                suite.test("$tag: gray within 1/255 of Python preprocess_gray") {
                    val expected = npy(entry["gray"]).toGrayImage()
                    val actual = kotlinGray(frame, size, interp)
                    val d = diff(expected, actual)
                    grayPixels += d.pixels
                    grayMismatches += d.mismatches
                    expect(d.maxAbs <= 1) { "max difference ${d.maxAbs} gray levels; ${d.mismatches} of ${d.pixels} pixels differ" }
                }
                if (entry["input"] != null) {
                    suite.test("$tag: model input (3,S,S) within 1/255 of Python preprocess_frame") {
                        val expected = npy(entry["input"])
                        expectEquals(listOf(3, size, size), expected.shape.toList(), "shape")
                        val want = expected.float32()
                        val got = Preprocess.toModelInput(kotlinGray(frame, size, interp))
                        var maxAbs = 0.0
                        var notIdentical = 0
                        for (i in want.indices) {
                            val a = Math.abs(want[i].toDouble() - got[i].toDouble())
                            if (a > maxAbs) maxAbs = a
                            if (want[i] != got[i]) notIdentical++
                        }
                        expect(maxAbs <= 1.0 / 255.0 + 1e-7) { "max difference $maxAbs; $notIdentical of ${want.size} values differ" }
                    }
                }
                if (entry["cv2"] != null) {
                    suite.test("$tag: OPENCV_LINEAR bit-exact with cv2.resize INTER_LINEAR") {
                        val expected = npy(entry["cv2"]).toGrayImage()
                        val d = diff(expected, kotlinGray(frame, size, Interpolation.OPENCV_LINEAR))
                        expect(d.mismatches == 0L) { "max difference ${d.maxAbs} gray levels; ${d.mismatches} of ${d.pixels} pixels differ" }
                    }
                }
            }
            if (case["prob"] != null) {
                suite.test("$label frame $id: mask from the fused probability equals Python's exactly") {
                    val prob = npy(case["prob"]).float32()
                    val expected = npy(case["mask"]).uint8()
                    val got = Threshold.mask(prob, threshold(index), rule(index))
                    // (That the committed set's masks are about half bone, so this comparison has
                    // something to compare, is checked on the Python side: tests/test_golden.py.)
                    var mismatches = 0
                    for (i in expected.indices) if (expected[i] != got[i]) mismatches++
                    expect(mismatches == 0) { "$mismatches of ${expected.size} mask pixels differ" }
                }
            }
            if (case["risk"] != null && index["risk_formula"] == "self-soft-dice-disagreement-v1") {
                suite.test("$label frame $id: self-disagreement risk of the probability equals Python's") {
                    val got = Risk.selfDisagreement(npy(case["prob"]).float32(), threshold(index))
                    expectClose(num(case["risk"], "risk"), got, 1e-9, "risk")
                }
            }
            if (case["frame_mask"] != null) {
                suite.test("$label frame $id: frame-resolution mask equals the runtime's (except |p - t| < 1e-5)") {
                    val prob = npy(case["prob"]).float32()
                    val size = num(case["prob_size"], "prob_size").toInt()
                    val expected = npy(case["frame_mask"])
                    expectEquals(listOf(frame.height, frame.width), expected.shape.toList(), "shape")
                    val t = threshold(index)
                    val p = Postprocess.probabilityToFrame(prob, size, frame.width, frame.height)
                    val got = Threshold.mask(p, t, rule(index))
                    val want = expected.uint8()
                    var mismatches = 0
                    var excused = 0
                    for (i in want.indices) {
                        if (want[i] == got[i]) continue
                        // OpenCV's float resize may fuse multiply-adds: allow flips only on the threshold.
                        if (Math.abs(p[i] - t) < 1e-5f) excused++ else mismatches++
                    }
                    expect(mismatches == 0) { "$mismatches of ${want.size} pixels differ away from the threshold ($excused on it)" }
                }
            }
        }
        suite.test("$label all preprocessed gray pixels bit-exact with Python") {
            expect(grayPixels > 0) { "no gray pixels were compared" }
            expect(grayMismatches == 0L) { "$grayMismatches of $grayPixels pixels differ" }
        }
        suite.test("$label threshold probe: values at and next to the threshold") {
            val probe = MiniJson.obj(index["threshold_probe"], "threshold_probe")
            val prob = npy(probe["prob"]).float32()
            val expected = npy(probe["mask"]).uint8()
            val got = Threshold.mask(prob, threshold(index), rule(index))
            for (i in expected.indices) {
                expect(expected[i] == got[i]) { "prob ${prob[i]}: Python ${expected[i]}, Kotlin ${got[i]}" }
            }
        }
        if (index["drift_probe"] != null) {
            suite.test("$label drift probe: band and threshold from the card, EWMA, alarm, levels and intervals") {
                val probe = MiniJson.obj(index["drift_probe"], "drift_probe")
                val settings = RiskSettings.fromCard(MiniJson.obj(probe["card"], "card"))
                    ?: throw ExpectationFailed("the probe's card has no risk entry")
                val monitor = settings.monitor() ?: throw ExpectationFailed("the probe's card has no drift band")
                val risks = MiniJson.list(probe["risks"], "risks").map { (it as? Double) ?: Double.NaN }
                val ewma = MiniJson.list(probe["ewma"], "ewma")
                val alarm = MiniJson.list(probe["alarm"], "alarm")
                val levels = MiniJson.list(probe["levels"], "levels")
                expectEquals(risks.size, ewma.size, "sequence length")
                var seenHigh = false
                for (i in risks.indices) {
                    val on = monitor.update(risks[i], i.toLong())
                    expectClose(num(ewma[i], "ewma"), monitor.z, 1e-12, "ewma at frame $i")
                    expectEquals(num(alarm[i], "alarm") != 0.0, on, "alarm at frame $i")
                    val level = RiskLevel.of(risks[i], settings.threshold, on)
                    expectEquals(RiskLevel.fromPythonName(levels[i] as String), level, "level at frame $i")
                    seenHigh = seenHigh || level == RiskLevel.HIGH
                }
                val want = MiniJson.list(probe["alarm_intervals"], "alarm_intervals").map { iv ->
                    MiniJson.list(iv, "interval").map { num(it, "frame").toLong() }
                }
                expectEquals(want, monitor.intervals.map { it.toList() }, "alarm intervals")
                expect(want.size >= 2 && seenHigh) { "the probe should cross the band twice and pass the threshold" }
                expectEquals(num(probe["nonfinite"], "nonfinite").toLong(), monitor.nonfinite, "non-finite risks")
            }
        }
        suite.test("$label latency percentiles match numpy.percentile") {
            val probe = MiniJson.obj(index["latency_probe"], "latency_probe")
            val stats = LatencyStats(window = 10000)
            for (v in MiniJson.list(probe["samples_ms"], "samples_ms")) stats.record(num(v, "sample"))
            val s = stats.summary() ?: throw ExpectationFailed("no summary")
            val p = MiniJson.obj(probe["percentiles"], "percentiles")
            expectClose(num(p["50"], "p50"), s.p50Ms, 1e-9, "p50")
            expectClose(num(p["95"], "p95"), s.p95Ms, 1e-9, "p95")
            expectClose(num(p["99"], "p99"), s.p99Ms, 1e-9, "p99")
            expectClose(num(probe["mean_ms"], "mean"), s.meanMs, 1e-9, "mean")
        }
    }

    private fun expectNonEmpty(suite: TestSuite, cases: List<Any?>) {
        suite.test("$label has frames") { expect(cases.isNotEmpty()) { "no cases in the index" } }
    }

    private fun threshold(index: Map<String, Any?>): Float = num(index["threshold"], "threshold").toFloat()

    private fun rule(index: Map<String, Any?>): MaskRule = MaskRule.parse(index["mask_rule"] as? String ?: "")

    private class Diff(val pixels: Long, val mismatches: Long, val maxAbs: Int)

    private fun diff(expected: GrayImage, actual: GrayImage): Diff {
        expect(expected.width == actual.width && expected.height == actual.height) {
            "size ${actual.width}x${actual.height}, expected ${expected.width}x${expected.height}"
        }
        var mismatches = 0L
        var maxAbs = 0
        for (i in expected.pixels.indices) {
            val a = Math.abs((expected.pixels[i].toInt() and 0xFF) - (actual.pixels[i].toInt() and 0xFF))
            if (a != 0) mismatches++
            if (a > maxAbs) maxAbs = a
        }
        return Diff(expected.pixels.size.toLong(), mismatches, maxAbs)
    }
}
