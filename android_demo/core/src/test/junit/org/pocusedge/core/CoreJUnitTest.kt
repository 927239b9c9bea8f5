package org.pocusedge.core

import org.junit.Assert.assertEquals
import org.junit.Test
import java.io.File

/**
 * Android Studio / Gradle entry point (`./gradlew :core:test`) to the same tests that
 * run_tests.sh runs with the plain kotlinc: unit tests plus the committed golden vectors.
 */
class CoreJUnitTest {
    @Test
    fun coreAndGoldenTests() {
        val suite = runAllTests(listOf(File("src/test/resources/golden")))
        assertEquals(suite.failures.joinToString("\n"), 0, suite.failed)
    }
}
