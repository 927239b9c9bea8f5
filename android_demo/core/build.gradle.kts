// Pure Kotlin/JVM: no Android classes, so the same sources also compile with a plain kotlinc
// (CI uses Debian's kotlinc 1.3 through run_tests.sh: keep them to plain Kotlin and the JDK).
plugins {
    id("org.jetbrains.kotlin.jvm")
}

kotlin {
    jvmToolchain(17)
    // src/test/kotlin: the self-contained test harness (also run by run_tests.sh without JUnit);
    // src/test/junit: a JUnit entry point to it, so Android Studio's test runner shows the result.
    sourceSets.getByName("test").kotlin.srcDir("src/test/junit")
}

dependencies {
    testImplementation("junit:junit:4.13.2")
}

tasks.test {
    // The JUnit entry point reads the golden vectors from src/test/resources/golden.
    workingDir = projectDir
}
