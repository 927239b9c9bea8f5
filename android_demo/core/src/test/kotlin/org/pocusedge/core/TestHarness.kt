package org.pocusedge.core

/**
 * A minimal test harness (no JUnit jar is needed to build and run it: Debian's kotlinc and a
 * JDK are enough). Each test is a named block; a thrown exception or failed expectation fails
 * it. The run ends with the line "N passed, N failed" and a non-zero exit code on failure.
 */
class TestSuite {
    var passed = 0
        private set
    var failed = 0
        private set
    val failures = ArrayList<String>()

    fun test(name: String, body: () -> Unit) {
        try {
            body()
            passed++
            println("PASS  $name")
        } catch (e: Throwable) {
            failed++
            val why = e.message ?: e.toString()
            failures.add("$name: $why")
            println("FAIL  $name: $why")
        }
    }
}

class ExpectationFailed(message: String) : AssertionError(message)

fun expect(condition: Boolean, message: () -> String) {
    if (!condition) throw ExpectationFailed(message())
}

fun expectEquals(expected: Any?, actual: Any?, what: String) {
    if (expected != actual) throw ExpectationFailed("$what: expected $expected, got $actual")
}

fun expectClose(expected: Double, actual: Double, tol: Double, what: String) {
    if (Math.abs(expected - actual) > tol) throw ExpectationFailed("$what: expected $expected +- $tol, got $actual")
}

fun expectThrows(what: String, body: () -> Unit) {
    try {
        body()
    } catch (e: Exception) {
        return
    }
    throw ExpectationFailed("$what: expected an exception, none was thrown")
}
