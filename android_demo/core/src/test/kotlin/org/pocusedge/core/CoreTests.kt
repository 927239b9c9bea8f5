package org.pocusedge.core

/** Unit tests of the core against hand-derived values and brute-force references. */
object CoreTests {
    private fun ramp(width: Int, height: Int, f: (Int, Int) -> Int): GrayImage {
        val v = IntArray(width * height)
        for (y in 0 until height) for (x in 0 until width) v[y * width + x] = f(x, y)
        return GrayImage.fromInts(width, height, v)
    }

    fun register(suite: TestSuite) {
        suite.test("drift alarm: a step of d fires after ceil(log(1 - h/d) / log(1 - lam)) frames, both ways") {
            for (sign in listOf(1.0, -1.0)) {
                val lam = 0.1
                val half = 0.05
                val d = 0.2
                val monitor = DriftMonitor(DriftBand(0.3, half, lam))
                for (t in 0 until 100) expect(!monitor.update(0.3, t.toLong())) { "alarm before the step" }
                val expected = Math.ceil(Math.log(1 - half / d) / Math.log(1 - lam)).toInt()
                var fired = -1
                for (t in 1 until 200) if (monitor.update(0.3 + sign * d, (99 + t).toLong()) && fired < 0) fired = t
                expectEquals(expected, fired, "frames to the alarm")
                expectEquals(listOf(listOf(99L + expected, 298L)), monitor.intervals.map { it.toList() }, "intervals")
            }
        }
        suite.test("drift alarm: hysteresis makes one interval per excursion (lam = 1)") {
            val monitor = DriftMonitor(DriftBand(0.0, 1.0, 1.0, 0.5))
            for (x in listOf(0.0, 1.5, 0.8, 1.2, 0.2, 0.0, 1.1, 0.1)) monitor.update(x)
            expectEquals(listOf(listOf(1L, 3L), listOf(6L, 6L)), monitor.intervals.map { it.toList() }, "intervals")
        }
        suite.test("risk settings: bad bands and thresholds in the card are refused, absent ones are null") {
            expectThrows("NaN center") { DriftBand(Double.NaN, 1.0) }
            expectThrows("lambda 0") { DriftBand(0.0, 1.0, 0.0) }
            expectThrows("no half width") { DriftBand.fromMap(mapOf("center" to 0.1)) }
            expectEquals(null, RiskSettings.fromCard(mapOf("threshold" to 0.5)), "card without risk")
            val none = RiskSettings.fromCard(mapOf("risk" to mapOf("formula" to "f", "threshold" to null, "drift" to null)))
            expect(none != null && none.threshold == null && none.monitor() == null) { "uncalibrated risk entry" }
            expectEquals(RiskLevel.OK, RiskLevel.of(0.9, null, false), "no threshold: never amber")
            expectEquals(RiskLevel.HIGH, RiskLevel.of(0.31, 0.3, false), "above the threshold")
            expectEquals(RiskLevel.OK, RiskLevel.of(0.3, 0.3, false), "at the threshold (risk > threshold)")
            expectEquals(RiskLevel.ALARM, RiskLevel.of(0.0, 0.3, true), "alarm wins")
        }
        suite.test("risk: soft-Dice disagreement of known maps (as models/risk.py)") {
            val m = FloatArray(64)
            for (i in 0 until 8) m[18 + i % 4 + 8 * (i / 4)] = 1f
            expectClose(0.0, Risk.branchDisagreement(m, m), 1e-12, "identical")
            expectClose(0.0, Risk.selfDisagreement(m), 1e-12, "crisp map")
            val flat = FloatArray(64) { 0.6f }
            expectClose(1.0 - (2 * 0.6 * 64 + 1) / (0.6 * 64 + 64 + 1), Risk.selfDisagreement(flat), 1e-6, "flat 0.6")
        }
        suite.test("padToSquare keeps a wide frame at the top-left and zero-fills the bottom rows") {
            val f = ramp(5, 3) { x, y -> 10 * y + x + 1 }
            val p = Preprocess.padToSquare(f)
            expectEquals(5, p.width, "width")
            expectEquals(5, p.height, "height")
            for (y in 0 until 5) for (x in 0 until 5) {
                val want = if (y < 3) 10 * y + x + 1 else 0
                expectEquals(want, p[x, y], "pixel ($x,$y)")
            }
        }
        suite.test("padToSquare keeps a tall frame at the top-left and zero-fills the right columns") {
            val f = ramp(2, 4) { x, y -> 1 + x + 2 * y }
            val p = Preprocess.padToSquare(f)
            expectEquals(4, p.width, "width")
            for (y in 0 until 4) for (x in 0 until 4) expectEquals(if (x < 2) 1 + x + 2 * y else 0, p[x, y], "pixel ($x,$y)")
        }
        suite.test("2x upscale of a 2-pixel ramp gives the half-pixel bilinear values 0,25,75,100 (both modes)") {
            // Half-pixel centres: output i samples input (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
            // clamped to [0, 1] -> 0, 25, 75, 100. Align-corners would give 0, 33, 67, 100.
            val f = ramp(2, 2) { x, _ -> 100 * x }
            for (mode in Interpolation.values()) {
                val r = Preprocess.resize(f, 4, 4, mode)
                for (y in 0 until 4) {
                    expectEquals(listOf(0, 25, 75, 100), (0 until 4).map { r[it, y] }, "$mode row $y")
                }
            }
        }
        suite.test("a constant frame stays constant through pad-free resizes of any size (both modes)") {
            for (mode in Interpolation.values()) for (n in listOf(1, 3, 7, 64, 100)) for (m in listOf(1, 5, 64, 224)) {
                val f = ramp(n, n) { _, _ -> 173 }
                val r = Preprocess.resize(f, m, m, mode)
                for (i in r.pixels.indices) expectEquals(173, r.pixels[i].toInt() and 0xFF, "$mode $n->$m pixel $i")
            }
        }
        suite.test("BILINEAR_FLOAT64 equals a brute-force evaluation of its documented formula") {
            // The reference below evaluates the formula per output pixel (columns first, not the
            // implementation's row pass): algebraically the same bilinear weights, so any
            // difference beyond rounding noise means an indexing or clamping error.
            val f = ramp(37, 29) { x, y -> (x * 37 + y * 91 + x * y) % 256 }
            val sq = Preprocess.padToSquare(f)
            for (m in listOf(16, 64, 100)) {
                val r = Preprocess.resize(sq, m, m, Interpolation.BILINEAR_FLOAT64)
                val n = sq.width
                fun tap(i: Int): Double = Math.min(Math.max((i + 0.5) * n / m - 0.5, 0.0), (n - 1).toDouble())
                for (y in 0 until m) for (x in 0 until m) {
                    val py = tap(y); val px = tap(x)
                    val y0 = Math.floor(py).toInt(); val x0 = Math.floor(px).toInt()
                    val y1 = Math.min(y0 + 1, n - 1); val x1 = Math.min(x0 + 1, n - 1)
                    val wy = py - y0; val wx = px - x0
                    val v = (sq[x0, y0] * (1 - wx) + sq[x1, y0] * wx) * (1 - wy) + (sq[x0, y1] * (1 - wx) + sq[x1, y1] * wx) * wy
                    expect(Math.abs(v - r[x, y]) <= 0.5 + 1e-9) { "$m: pixel ($x,$y) = ${r[x, y]}, formula $v" }
                }
            }
        }
        suite.test("toModelInput repeats gray/255 into 3 identical CHW planes") {
            val g = ramp(3, 3) { x, y -> x * 100 + y }
            val t = Preprocess.toModelInput(g)
            expectEquals(27, t.size, "size")
            for (c in 0 until 3) for (i in 0 until 9) {
                expectEquals((g.pixels[i].toInt() and 0xFF) / 255f, t[c * 9 + i], "channel $c value $i")
            }
            expectEquals(1f, Preprocess.toModelInput(ramp(1, 1) { _, _ -> 255 })[0], "255 -> 1.0")
        }
        suite.test("threshold: > and >= differ exactly at the threshold") {
            val p = floatArrayOf(0f, 0.4999999f, 0.5f, 0.5000001f, 1f)
            expectEquals(listOf<Byte>(0, 0, 0, 1, 1), Threshold.mask(p, 0.5f, MaskRule.GREATER).toList(), "GREATER")
            expectEquals(listOf<Byte>(0, 0, 1, 1, 1), Threshold.mask(p, 0.5f, MaskRule.GREATER_OR_EQUAL).toList(), "GREATER_OR_EQUAL")
            expectEquals(MaskRule.GREATER, MaskRule.parse("prob > threshold"), "parse")
            expectThrows("unknown rule") { MaskRule.parse("prob ~ threshold") }
        }
        suite.test("probabilityToFrame drops the padding and upsamples with half-pixel bilinear") {
            // Model 2x2 map for a frame 4 wide x 2 high: side 4, the bottom model row is padding.
            // Row 0 = [0, 1] upsampled x2 with half-pixel centres: 0, 0.25, 0.75, 1. Frame rows are
            // model rows at positions -0.25 and 0.25 -> between row 0 and the padding row (0.9).
            val prob = floatArrayOf(0f, 1f, 0.9f, 0.9f)
            val p = Postprocess.probabilityToFrame(prob, 2, 4, 2)
            expectEquals(8, p.size, "size")
            val top = listOf(0.0, 0.25, 0.75, 1.0)
            for (x in 0 until 4) {
                expectClose(top[x], p[x].toDouble(), 1e-6, "frame (x=$x, y=0)")
                // y=1 samples model row position 0.25: 0.75 * row0 + 0.25 * padding row.
                expectClose(0.75 * top[x] + 0.25 * 0.9, p[4 + x].toDouble(), 1e-6, "frame (x=$x, y=1)")
            }
            val constant = Postprocess.probabilityToFrame(FloatArray(64 * 64) { 0.3f }, 64, 200, 150)
            for (v in constant) expectClose(0.3, v.toDouble(), 1e-6, "constant map")
        }
        suite.test("overlay fills mask pixels like the runtime (gray*(1-a) + colour*a, truncated), leaves others gray") {
            // Hand values at alpha 0.35: 100*0.65 + 255*0.35 = 154.25 -> 154; 100*0.65 + 60*0.35 = 86.0 -> 86.
            expectEquals(154, Overlay.blendChannel(100, 255, 0.35), "red channel")
            expectEquals(86, Overlay.blendChannel(100, 60, 0.35), "blue channel")
            for (g in 0..255) {
                expectEquals(g, Overlay.blendChannel(g, 255, 0.0), "alpha 0 keeps gray $g")
                expectEquals(37, Overlay.blendChannel(g, 37, 1.0), "alpha 1 paints the colour over gray $g")
            }
            val frame = GrayImage.fromInts(2, 1, intArrayOf(100, 200))
            val px = Overlay.composite(frame, byteArrayOf(1, 0))
            expectEquals(Overlay.argb(154, 135, 86), px[0], "masked pixel, default colour")
            expectEquals(Overlay.argb(200, 200, 200), px[1], "unmasked pixel")
            expectThrows("mask of the wrong size") { Overlay.composite(frame, byteArrayOf(1)) }
        }
        suite.test("latency percentiles of 1..100 ms are numpy's 50.5 / 95.05 / 99.01, FPS = 1000 / mean") {
            val s = LatencyStats(window = 100)
            for (v in (1..100).shuffled(java.util.Random(3))) s.record(v.toDouble())
            val r = s.summary() ?: throw ExpectationFailed("no summary")
            expectClose(50.5, r.p50Ms, 1e-9, "p50")
            expectClose(95.05, r.p95Ms, 1e-9, "p95")
            expectClose(99.01, r.p99Ms, 1e-9, "p99")
            expectClose(1000.0 / 50.5, r.fps, 1e-9, "fps")
        }
        suite.test("latency window keeps only the newest samples") {
            val s = LatencyStats(window = 4)
            for (v in listOf(100.0, 100.0, 1.0, 2.0, 3.0, 4.0)) s.record(v)
            val r = s.summary() ?: throw ExpectationFailed("no summary")
            expectEquals(4, r.count, "count")
            expectClose(2.5, r.meanMs, 1e-12, "mean of 1..4")
            expectThrows("negative latency") { s.record(-1.0) }
        }
        suite.test("FpsMeter: ticks every 20 ms read 50 FPS") {
            val m = FpsMeter(window = 10)
            for (i in 0 until 25) m.tick(1_000_000_000L + i * 20_000_000L)
            expectClose(50.0, m.fps(), 1e-9, "fps")
        }
        suite.test("DropOldestQueue keeps the newest frames and counts the dropped ones") {
            val q = DropOldestQueue<Int>(2)
            for (i in 1..5) q.offer(i)
            expectEquals(3L, q.dropped, "dropped")
            expectEquals(4, q.poll(0), "oldest kept")
            expectEquals(5, q.poll(0), "newest")
            expectEquals(null, q.poll(10), "empty after timeout")
            val producer = Thread { Thread.sleep(20); q.offer(42) }
            producer.start()
            expectEquals(42, q.poll(5000), "a waiting consumer wakes on offer")
            producer.join()
        }
        suite.test("npy reader: parses a v1.0 header and rejects a truncated file") {
            val header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
            val padded = header.padEnd(64 - 10 - 1) + "\n"
            val bytes = java.io.ByteArrayOutputStream()
            bytes.write(byteArrayOf(0x93.toByte(), 'N'.toByte(), 'U'.toByte(), 'M'.toByte(), 'P'.toByte(), 'Y'.toByte(), 1, 0, padded.length.toByte(), 0))
            bytes.write(padded.toByteArray(Charsets.ISO_8859_1))
            val data = java.nio.ByteBuffer.allocate(8).order(java.nio.ByteOrder.LITTLE_ENDIAN).putFloat(1.5f).putFloat(-2f).array()
            bytes.write(data)
            val a = NpyArray.parse(bytes.toByteArray())
            expectEquals(listOf(2), a.shape.toList(), "shape")
            expectEquals(listOf(1.5f, -2f), a.float32().toList(), "values")
            val cut = bytes.toByteArray().copyOf(bytes.size() - 1)
            expectThrows("truncated npy") { NpyArray.parse(cut) }
        }
        suite.test("MiniJson parses nested values and escapes, rejects trailing text") {
            val v = MiniJson.obj(MiniJson.parse("{\"a\": [1, 2.5e1, -3], \"b\": {\"c\": \"x\\\"\\u0041\"}, \"d\": null, \"e\": true}"), "doc")
            expectEquals(listOf(1.0, 25.0, -3.0), v["a"], "a")
            expectEquals("x\"A", MiniJson.obj(v["b"], "b")["c"], "b.c")
            expectEquals(null, v["d"], "d")
            expectEquals(true, v["e"], "e")
            expectThrows("trailing text") { MiniJson.parse("{} x") }
            expectThrows("unterminated") { MiniJson.parse("[1, 2") }
        }
    }
}
