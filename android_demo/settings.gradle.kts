// pocus-edge Android demo: `app` (the Activity, ONNX Runtime Mobile) + `core` (pure Kotlin,
// no Android dependency: preprocessing, threshold, overlay, latency statistics).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "pocus-edge-android-demo"
include(":app", ":core")
