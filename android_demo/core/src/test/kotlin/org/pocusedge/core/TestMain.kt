package org.pocusedge.core

import java.io.File
import kotlin.system.exitProcess

/**
 * Runs every core test:  java -cp core-tests.jar org.pocusedge.core.TestMainKt
 *     [--golden DIR]...            golden folders to check (default: src/test/resources/golden)
 *     [--interpolation NAME]       nearest | align-corners: deliberately wrong resize, to show
 *                                  that the golden comparison fails
 * Ends with "N passed, N failed"; exit code 1 when anything failed.
 */
fun runAllTests(goldenDirs: List<File>, resizeOverride: String? = null): TestSuite {
    val suite = TestSuite()
    CoreTests.register(suite)
    for (dir in goldenDirs) GoldenTests(dir, resizeOverride).register(suite)
    return suite
}

fun main(args: Array<String>) {
    val goldens = ArrayList<File>()
    var override: String? = null
    var i = 0
    while (i < args.size) {
        when (args[i]) {
            "--golden" -> { goldens.add(File(args.getOrElse(i + 1) { usage("--golden needs a folder") })); i += 2 }
            "--interpolation" -> {
                override = args.getOrElse(i + 1) { usage("--interpolation needs a name") }
                if (WrongResizers.byName(override) == null) usage("unknown interpolation '$override' (nearest | align-corners)")
                i += 2
            }
            else -> usage("unknown argument '${args[i]}'")
        }
    }
    if (goldens.isEmpty()) goldens.add(File("src/test/resources/golden"))
    if (override != null) println("NOTE  golden comparisons use the deliberately wrong interpolation '$override'")
    val suite = runAllTests(goldens, override)
    println("${suite.passed} passed, ${suite.failed} failed")
    exitProcess(if (suite.failed == 0) 0 else 1)
}

private fun usage(message: String): Nothing {
    System.err.println("error: $message")
    System.err.println("usage: TestMainKt [--golden DIR]... [--interpolation nearest|align-corners]")
    exitProcess(2)
}
