plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val onnxruntimeVersion: String = rootProject.file("onnxruntime.version").readText().trim()

android {
    namespace = "org.pocusedge.demo"
    compileSdk = 34

    defaultConfig {
        applicationId = "org.pocusedge.demo"
        minSdk = 26
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    kotlinOptions {
        jvmTarget = "17"
    }

    androidResources {
        // The model is memory-read from the APK: keep it uncompressed.
        noCompress += listOf("onnx", "ort")
    }
}

dependencies {
    implementation(project(":core"))
    // ONNX Runtime Mobile/Android (CPU; NNAPI/XNNPACK execution providers available). Its version
    // lives in one file, which CI also reads to load every exported artifact in that same
    // onnxruntime (make app-runtime-test).
    implementation("com.microsoft.onnxruntime:onnxruntime-android:$onnxruntimeVersion")
}
