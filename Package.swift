// swift-tools-version:6.0
//
// Three rings (see ARCHITECTURE.md, "Code layout"), dependencies pointing inward:
//   core      FTCore                         pure value types, wire format; no I/O
//   adapters  FTErasure, FTZMQ, FTVerbs      the only modules that import a C library
//             (CISAL, CZMQ, CVerbsShim)      the C libraries themselves
//   shells    FTBenchKit, executables        thin `@main` files over libraries
import PackageDescription

let package = Package(
    name: "ft",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "FTCore", targets: ["FTCore"]),
        .library(name: "FTErasure", targets: ["FTErasure"]),
        .library(name: "FTZMQ", targets: ["FTZMQ"]),
        .library(name: "FTVerbs", targets: ["FTVerbs"]),
        .executable(name: "ft-bench", targets: ["ft-bench"]),
        .executable(name: "ft-smp", targets: ["ft-smp"]),
        .executable(name: "ft-toy-worker", targets: ["ft-toy-worker"]),
        .executable(name: "ft-coordinator", targets: ["ft-coordinator"]),
        .executable(name: "ftctl", targets: ["ftctl"]),
        .executable(name: "ft-demo-trainer", targets: ["ft-demo-trainer"]),
        .executable(name: "ft-launch", targets: ["ft-launch"]),
        // The worker library's C interface (Sources/CFTWorker/include/ft_worker.h)
        // as a shared library, for workers that are not written in Swift.
        .library(name: "FTWorkerC", type: .dynamic, targets: ["FTWorkerC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        // Prometheus exposition (the coordinator's /metrics); its only dependencies are swift-metrics and swift-atomics.
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // MARK: core (no I/O)
        .target(name: "FTCore"),

        // MARK: C libraries
        .systemLibrary(name: "CISAL", pkgConfig: "libisal",
                       providers: [.apt(["libisal-dev"])]),
        // No pkgConfig on purpose: libzmq.pc drags in Kerberos -isystem flags that
        // SwiftPM rejects with a warning on every build. The module map links `zmq`.
        .systemLibrary(name: "CZMQ", providers: [.apt(["libzmq3-dev"])]),
        // OpenBLAS's CBLAS for the demo model's matrix products.
        .systemLibrary(name: "CBLAS", providers: [.apt(["libopenblas-dev"])]),
        // verbs.h hides most of its API behind function-like macros and static
        // inlines, which Swift cannot import reliably; this C target wraps them.
        .target(name: "CVerbsShim", linkerSettings: [.linkedLibrary("ibverbs")]),
        // Linux calls Swift cannot import (variadic syscall/prctl, posix_spawn attributes).
        .target(name: "CPlatform"),

        // MARK: adapters (one per C library; no C type in any public signature)
        .target(name: "FTErasure", dependencies: ["CISAL", "FTCore"]),
        .target(name: "FTZMQ", dependencies: ["CZMQ", "FTCore"]),
        .target(name: "FTSystem", dependencies: ["CPlatform", "FTCore"]),
        .target(name: "FTBLAS", dependencies: ["CBLAS"]),
        // The persistent tier's files: writing a node's part, reading one back (decoding from the group's parity).
        .target(name: "FTPersist", dependencies: ["FTCore", "FTErasure", "FTSystem"]),
        .target(name: "FTVerbs", dependencies: [
            "CVerbsShim", "FTCore",
            .product(name: "Logging", package: "swift-log"),
        ]),

        // MARK: shells and executables
        .target(name: "FTWorker", dependencies: ["FTCore", "FTErasure", "FTSystem", "FTZMQ"]),
        // The C interface: the header (and its plain-C parts) and the Swift
        // implementation behind it, built into libFTWorkerC.so.
        .target(name: "CFTWorker"),
        .target(name: "FTWorkerC", dependencies: ["CFTWorker", "FTControl", "FTCore", "FTWorker"]),
        .target(name: "FTSMP", dependencies: [
            "FTCore", "FTErasure", "FTPersist", "FTSystem", "FTZMQ", "FTControl",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "FTToy", dependencies: ["FTCore", "FTErasure", "FTTraining", "FTWorker"]),
        .target(name: "FTTraining", dependencies: ["FTControl", "FTCore", "FTSystem", "FTWorker"]),
        .target(name: "FTDemo", dependencies: ["FTBLAS", "FTCore", "FTErasure", "FTTraining", "FTWorker"]),
        .target(name: "FTLauncher", dependencies: ["FTControl", "FTCore", "FTPersist", "FTSystem", "FTZMQ"]),
        .target(name: "FTControl", dependencies: [
            "FTCore", "FTSystem", "FTZMQ",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        .executableTarget(name: "ft-smp", dependencies: [
            "FTControl", "FTSMP", "FTZMQ",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "ft-coordinator", dependencies: [
            "FTControl", "FTCore", "FTSystem", "FTZMQ",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "ftctl", dependencies: [
            "FTControl", "FTCore", "FTPersist", "FTSystem", "FTZMQ",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "ft-launch", dependencies: [
            "FTLauncher", "FTPersist", "FTSystem",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "ft-chaos", dependencies: [
            "FTLauncher", "FTSystem",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "ft-demo-trainer", dependencies: [
            "FTDemo", "FTToy", "FTTraining", "FTWorker", "FTControl", "FTSystem",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "ft-toy-worker", dependencies: [
            "FTToy", "FTWorker", "FTSystem", "FTControl", "FTTraining",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .target(name: "FTBenchKit", dependencies: [
            "FTCore", "FTErasure", "FTPersist", "FTSMP", "FTWorker", "FTSystem", "FTLauncher", "FTZMQ",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "ft-bench", dependencies: [
            "FTBenchKit", "FTSystem",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        // MARK: tests
        .testTarget(name: "FTCoreTests", dependencies: ["FTCore", "FTErasure"]),
        .testTarget(name: "FTErasureTests", dependencies: ["FTErasure", "FTCore"]),
        .testTarget(name: "FTPersistTests", dependencies: ["FTPersist", "FTCore", "FTErasure", "FTSystem"]),
        .testTarget(name: "FTZMQTests", dependencies: ["FTZMQ"]),
        .testTarget(name: "FTVerbsTests", dependencies: [
            "FTVerbs",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "FTBenchKitTests", dependencies: ["FTBenchKit"]),
        .testTarget(name: "FTControlTests", dependencies: [
            "FTControl", "FTCore", "FTPersist", "FTSystem", "FTToy", "FTZMQ", "FTWorker", "FTLauncher",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "FTSnapshotTests", dependencies: [
            "FTCore", "FTPersist", "FTSMP", "FTWorker", "FTToy", "FTSystem", "FTZMQ",
            .product(name: "Logging", package: "swift-log"),
        ], exclude: ["ft_worker_test.c"]),  // a C program CProgramTests compiles against libFTWorkerC.so
    ]
)
