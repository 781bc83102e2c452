import CFTWorker
import FTCore
import FTWorker
import Foundation

// The snapshot half of the C interface (ft_worker.h): clients, registrations,
// snapshots, restores and external (device) tensors, over `SnapshotClient`.

final class ClientBox {
    let client: SnapshotClient
    init(_ client: SnapshotClient) { self.client = client }
}

final class RegistrationBox {
    var tensors: [RegisteredTensor] = []
    var names: Set<String> = []
}

@_cdecl("ft_abi_version")
public func ft_abi_version() -> Int32 { FT_ABI_VERSION }

@_cdecl("ft_client_open")
public func ft_client_open(_ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    abiCall {
        guard let out else { throw ABIFailure.invalid("out is NULL") }
        out.pointee = nil
        let identity: WorkerIdentity
        switch WorkerIdentity.fromEnvironment() {
        case .success(let i): identity = i
        case .failure(let e): throw ABIFailure(.noEnvironment, e.message)
        }
        out.pointee = handle(ClientBox(try SnapshotClient(identity: identity)))
    }
}

@_cdecl("ft_client_close")
public func ft_client_close(_ client: OpaquePointer?) { release(client, as: ClientBox.self) }

@_cdecl("ft_client_identity")
public func ft_client_identity(_ client: OpaquePointer?, _ rank: UnsafeMutablePointer<Int64>?, _ size: UnsafeMutablePointer<Int64>?,
                               _ restarts: UnsafeMutablePointer<Int64>?) -> Int32 {
    abiCall {
        let box: ClientBox = try object(client, "client")
        let identity = box.client.identity
        rank?.pointee = Int64(identity.dpRank)
        size?.pointee = Int64(identity.dpSize)
        restarts?.pointee = Int64(identity.restartCount)
    }
}

// MARK: registration

@_cdecl("ft_registration_new")
public func ft_registration_new(_ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    abiCall { try store(handle(RegistrationBox()), out, "out") }
}

@_cdecl("ft_registration_free")
public func ft_registration_free(_ registration: OpaquePointer?) { release(registration, as: RegistrationBox.self) }

@_cdecl("ft_registration_count")
public func ft_registration_count(_ registration: OpaquePointer?) -> Int {
    guard let box: RegistrationBox = try? object(registration, "registration") else { return 0 }
    return box.tensors.count
}

@_cdecl("ft_registration_add")
public func ft_registration_add(_ registration: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ dtype: Int32, _ ndim: Int32,
                                _ shape: UnsafePointer<Int64>?, _ role: Int32, _ flags: UInt32,
                                _ data: UnsafeMutableRawPointer?) -> Int32 {
    abiCall {
        let box: RegistrationBox = try object(registration, "registration")
        guard let name else { throw ABIFailure.invalid("tensor name is NULL") }
        guard let text = String(validatingCString: name) else { throw ABIFailure.invalid("tensor name is not UTF-8") }
        let spec = try validatedSpec(name: text, dtype: dtype, ndim: ndim, shape: shape, role: role, flags: flags)
        guard !box.names.contains(text) else { throw ABIFailure.invalid("tensor '\(text)' is already in this registration") }
        let external = flags & FT_TENSOR_EXTERNAL != 0
        if external {
            box.tensors.append(RegisteredTensor(externalSpec: spec))
        } else {
            guard data != nil || spec.byteCount == 0 else { throw ABIFailure.invalid("tensor '\(text)': data is NULL") }
            box.tensors.append(RegisteredTensor(spec: spec, buffer: UnsafeMutableRawBufferPointer(start: data, count: spec.byteCount)))
        }
        box.names.insert(text)
    }
}

/// A tensor's spec from C arguments, every one checked (names, codes,
/// dimensions, and the byte count without overflow).
private func validatedSpec(name: String, dtype: Int32, ndim: Int32, shape: UnsafePointer<Int64>?, role: Int32,
                           flags: UInt32) throws -> TensorSpec {
    guard !name.isEmpty, name.utf8.count <= 255 else {
        throw ABIFailure.invalid("tensor name '\(name.prefix(64))' must be 1-255 bytes of UTF-8 (it has \(name.utf8.count))")
    }
    guard let type = UInt8(exactly: dtype).flatMap(DType.init(rawValue:)) else {
        throw ABIFailure.invalid("tensor '\(name)': unknown dtype code \(dtype)")
    }
    guard let kind = UInt8(exactly: role).flatMap(TensorRole.init(rawValue:)) else {
        throw ABIFailure.invalid("tensor '\(name)': unknown role code \(role)")
    }
    guard flags & ~(FT_TENSOR_REPLICATED | FT_TENSOR_EXTERNAL) == 0 else {
        throw ABIFailure.invalid("tensor '\(name)': unknown flags 0x\(String(flags, radix: 16))")
    }
    guard (0...255).contains(ndim) else { throw ABIFailure.invalid("tensor '\(name)': \(ndim) dimensions (0-255 allowed)") }
    guard ndim == 0 || shape != nil else { throw ABIFailure.invalid("tensor '\(name)': shape is NULL") }
    var dims: [Int] = []
    var elements = 1
    for i in 0..<Int(ndim) {
        let d = shape![i]
        guard d >= 0, let n = Int(exactly: d) else { throw ABIFailure.invalid("tensor '\(name)': dimension \(i) is \(d)") }
        let (product, overflow) = elements.multipliedReportingOverflow(by: n)
        guard !overflow else { throw ABIFailure.invalid("tensor '\(name)': the shape's element count overflows") }
        elements = product
        dims.append(n)
    }
    guard !elements.multipliedReportingOverflow(by: type.size).overflow else {
        throw ABIFailure.invalid("tensor '\(name)': the byte count overflows")
    }
    return TensorSpec(name: name, dtype: type, shape: dims, role: kind, replicated: flags & FT_TENSOR_REPLICATED != 0)
}

@_cdecl("ft_client_register")
public func ft_client_register(_ client: OpaquePointer?, _ registration: OpaquePointer?,
                               _ committed: UnsafeMutablePointer<Int64>?) -> Int32 {
    abiCall {
        let box: ClientBox = try object(client, "client")
        let reg: RegistrationBox = try object(registration, "registration")
        guard !reg.tensors.isEmpty else { throw ABIFailure.invalid("the registration holds no tensor") }
        let step = try box.client.register(reg.tensors)
        committed?.pointee = Int64(step ?? -1)
    }
}

// MARK: snapshot and restore

@_cdecl("ft_client_snapshot")
public func ft_client_snapshot(_ client: OpaquePointer?, _ step: Int64) -> Int32 {
    abiCall {
        let box: ClientBox = try object(client, "client")
        guard step >= 0 else { throw ABIFailure.invalid("snapshot step \(step) is negative") }
        try box.client.snapshot(step: Int(step))
    }
}

@_cdecl("ft_client_wait_before_update")
public func ft_client_wait_before_update(_ client: OpaquePointer?) -> Int32 {
    abiCall { try (object(client, "client") as ClientBox).client.waitBeforeUpdate() }
}

@_cdecl("ft_client_wait_copied")
public func ft_client_wait_copied(_ client: OpaquePointer?, _ count: Int) -> Int32 {
    abiCall { try (object(client, "client") as ClientBox).client.waitCopied(count: count) }
}

@_cdecl("ft_client_wait_for_round")
public func ft_client_wait_for_round(_ client: OpaquePointer?) -> Int32 {
    abiCall { try (object(client, "client") as ClientBox).client.waitForRound() }
}

@_cdecl("ft_client_can_snapshot")
public func ft_client_can_snapshot(_ client: OpaquePointer?, _ previous: Int64, _ can: UnsafeMutablePointer<Int32>?) -> Int32 {
    abiCall {
        let box: ClientBox = try object(client, "client")
        try store(try box.client.canSnapshot(after: previous < 0 ? nil : Int(previous)) ? 1 : 0, can, "can")
    }
}

@_cdecl("ft_client_restore")
public func ft_client_restore(_ client: OpaquePointer?, _ step: UnsafeMutablePointer<Int64>?) -> Int32 {
    abiCall {
        let box: ClientBox = try object(client, "client")
        guard let step else { throw ABIFailure.invalid("step is NULL") }
        step.pointee = Int64(try box.client.restore() ?? -1)
    }
}

@_cdecl("ft_client_restore_from")
public func ft_client_restore_from(_ client: OpaquePointer?, _ step: Int64, _ sources: UnsafePointer<UnsafePointer<CChar>?>?,
                                   _ count: Int) -> Int32 {
    abiCall {
        let box: ClientBox = try object(client, "client")
        guard step >= 0 else { throw ABIFailure.invalid("restore step \(step) is negative") }
        guard count >= 0, count == 0 || sources != nil else { throw ABIFailure.invalid("sources is NULL") }
        let list = (0..<count).map { i in sources![i].map { String(cString: $0) } ?? "" }
        try box.client.restore(step: Int(step), sources: list)
    }
}

@_cdecl("ft_client_stats")
public func ft_client_stats(_ client: OpaquePointer?, _ staged: UnsafeMutablePointer<Int64>?, _ skipped: UnsafeMutablePointer<Int64>?,
                            _ blocked: UnsafeMutablePointer<Double>?, _ lastRound: UnsafeMutablePointer<Double>?,
                            _ lastCommitted: UnsafeMutablePointer<Int64>?) -> Int32 {
    abiCall {
        let stats = (try object(client, "client") as ClientBox).client.stats
        staged?.pointee = Int64(stats.snapshotsStaged)
        skipped?.pointee = Int64(stats.snapshotsSkipped)
        blocked?.pointee = stats.blockedSeconds
        lastRound?.pointee = stats.lastRoundSeconds
        lastCommitted?.pointee = Int64(stats.lastCommittedStep ?? -1)
    }
}

// MARK: external tensors

@_cdecl("ft_client_slot")
public func ft_client_slot(_ client: OpaquePointer?, _ index: Int32, _ base: UnsafeMutablePointer<UnsafeMutableRawPointer?>?,
                           _ bytes: UnsafeMutablePointer<Int>?) -> Int32 {
    abiCall {
        let slot = try (object(client, "client") as ClientBox).client.slot(Int(index))
        try store(slot.baseAddress, base, "base")
        try store(slot.count, bytes, "bytes")
    }
}

@_cdecl("ft_client_placement")
public func ft_client_placement(_ client: OpaquePointer?, _ index: Int, _ slotOffset: UnsafeMutablePointer<Int>?,
                                _ sourceOffset: UnsafeMutablePointer<Int>?, _ storedBytes: UnsafeMutablePointer<Int>?) -> Int32 {
    abiCall {
        let p = try (object(client, "client") as ClientBox).client.placement(ofTensor: index)
        slotOffset?.pointee = p.slotOffset
        sourceOffset?.pointee = p.sourceRange.lowerBound
        storedBytes?.pointee = p.sourceRange.count
    }
}

@_cdecl("ft_client_round_slot")
public func ft_client_round_slot(_ client: OpaquePointer?, _ slot: UnsafeMutablePointer<Int32>?) -> Int32 {
    abiCall {
        let box: ClientBox = try object(client, "client")
        guard let slot else { throw ABIFailure.invalid("slot is NULL") }
        slot.pointee = Int32(try box.client.roundSlot() ?? -1)
    }
}

@_cdecl("ft_client_external_landed")
public func ft_client_external_landed(_ client: OpaquePointer?, _ ok: Int32) -> Int32 {
    abiCall { (try object(client, "client") as ClientBox).client.externalCopiesLanded(ok: ok != 0) }
}

@_cdecl("ft_client_set_restore_buffer")
public func ft_client_set_restore_buffer(_ client: OpaquePointer?, _ index: Int, _ host: UnsafeMutableRawPointer?, _ bytes: Int) -> Int32 {
    abiCall {
        let box: ClientBox = try object(client, "client")
        try box.client.setRestoreBuffer(host.map { UnsafeMutableRawBufferPointer(start: $0, count: bytes) }, forTensor: index)
    }
}
