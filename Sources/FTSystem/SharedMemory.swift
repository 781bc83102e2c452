import CPlatform
#if canImport(Glibc)
import Glibc
#endif

/// Copies with non-temporal stores (see `ft_copy_nontemporal`): for bulk
/// copies whose destination will not be read again soon.
/// Has malloc keep freed blocks below `bytes` for reuse (heap, not mmap; no
/// trimming below `trimBytes`): a process that receives a stream of large
/// network buffers then stops paying a page fault per page of each.
public func keepFreedBlocks(below bytes: Int, trimAbove trimBytes: Int) -> Bool {
    ft_keep_freed_blocks(Int32(clamping: bytes), Int32(clamping: trimBytes)) == 0
}

public func copyNonTemporal(_ destination: UnsafeMutableRawPointer, _ source: UnsafeRawPointer, _ count: Int) {
    ft_copy_nontemporal(destination, source, count)
}

/// A POSIX shared-memory segment (`/dev/shm/NAME`), mapped read-write.
///
/// Created with mode 0600 and `O_EXCL` (a name already in use is an error,
/// never silently shared), sized, mapped, and pre-faulted for writing, so the
/// snapshot path never takes a page fault. Unmapped when released; the name
/// stays until `unlink()` so that a restarted worker can map it again.
public final class SharedMemorySegment: @unchecked Sendable {
    public let name: String
    public let count: Int
    public let base: UnsafeMutableRawPointer

    private init(name: String, count: Int, base: UnsafeMutableRawPointer) {
        self.name = name
        self.count = count
        self.base = base
    }

    deinit { munmap(base, max(count, 1)) }

    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: count) }

    /// Free and total bytes of the file system under `path` (`/dev/shm`:
    /// what POSIX shared memory can still take), from `statvfs`.
    public static func space(path: String = "/dev/shm") throws(SystemError) -> (free: Int, total: Int) {
        var st = statvfs()
        _ = try sys("statvfs \(path)") { statvfs(path, &st) }
        let unit = Int(st.f_frsize == 0 ? st.f_bsize : st.f_frsize)
        let (free, o1) = Int(clamping: st.f_bavail).multipliedReportingOverflow(by: unit)
        let (total, o2) = Int(clamping: st.f_blocks).multipliedReportingOverflow(by: unit)
        return (o1 ? Int.max : free, o2 ? Int.max : total)
    }

    /// Creates `name` (which must start with "/") with `count` bytes.
    public static func create(name: String, count: Int, prefault: Bool = true) throws(SystemError) -> SharedMemorySegment {
        let fd = try sys("shm_open \(name) (create, 0600)") { shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        defer { close(fd) }
        do throws(SystemError) {
            // The umask may have narrowed the mode; make it exactly 0600.
            try sys("fchmod \(name)") { fchmod(fd, 0o600) }
            try sys("ftruncate \(name) to \(count) bytes") { ftruncate(fd, off_t(count)) }
            let base = try map(fd: fd, name: name, count: count, writable: true)
            if prefault {
                let rc = ft_prefault(base, count)
                if rc != 0 {
                    let err = errno
                    munmap(base, max(count, 1))
                    throw SystemError("prefault \(name) (\(count) bytes)", errno: err)
                }
            }
            return SharedMemorySegment(name: name, count: count, base: base)
        } catch {
            shm_unlink(name)
            throw error
        }
    }

    /// Maps an existing segment; its size must be `count`. `prefault` fills
    /// this process's page tables for the whole mapping now (the pages exist
    /// already), so later writes take no minor faults either.
    public static func open(name: String, count: Int, writable: Bool, prefault: Bool = false) throws(SystemError) -> SharedMemorySegment {
        let fd = try sys("shm_open \(name)") { shm_open(name, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC, 0) }
        defer { close(fd) }
        var st = stat()
        try sys("fstat \(name)") { fstat(fd, &st) }
        guard Int(st.st_size) == count else {
            throw SystemError("open \(name): size is \(st.st_size), expected \(count)", errno: EINVAL)
        }
        let base = try map(fd: fd, name: name, count: count, writable: writable)
        if prefault && writable && ft_prefault(base, count) != 0 {
            let err = errno
            munmap(base, max(count, 1))
            throw SystemError("prefault \(name) (\(count) bytes)", errno: err)
        }
        return SharedMemorySegment(name: name, count: count, base: base)
    }

    /// Faults in `range` of the mapping for writing (see `create(prefault:)`);
    /// lets a caller pre-fault a large segment in pieces and stay responsive.
    public func prefault(_ range: Range<Int>) throws(SystemError) {
        guard !range.isEmpty else { return }
        if ft_prefault(base + range.lowerBound, range.count) != 0 {
            throw SystemError("prefault \(name) bytes \(range)", errno: errno)
        }
    }

    /// Removes the name; the memory goes when the last mapping does.
    @discardableResult
    public static func unlink(name: String) -> Bool { shm_unlink(name) == 0 }

    /// The mode bits of an existing segment (for checks and tests).
    public static func mode(name: String) throws(SystemError) -> mode_t {
        var st = stat()
        try sys("stat /dev/shm\(name)") { stat("/dev/shm" + name, &st) }
        return st.st_mode & 0o777
    }

    public static func exists(name: String) -> Bool { access("/dev/shm" + name, F_OK) == 0 }

    private static func map(fd: Int32, name: String, count: Int, writable: Bool) throws(SystemError) -> UnsafeMutableRawPointer {
        let prot = writable ? PROT_READ | PROT_WRITE : PROT_READ
        guard let p = mmap(nil, max(count, 1), prot, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw SystemError("mmap \(name) (\(count) bytes)", errno: errno)
        }
        return p
    }
}

/// Faults in the pages of `buffer` for writing without touching its bytes
/// (MADV_POPULATE_WRITE), in pieces of `piece` bytes until `stop` says so:
/// memory about to be written at full speed (a restore into freshly
/// allocated tensors) then takes no page faults. Safe while other threads
/// write the buffer. Returns the bytes populated (0 where the kernel lacks
/// MADV_POPULATE_WRITE).
@discardableResult
public func populateForWrite(_ buffer: UnsafeMutableRawBufferPointer, piece: Int = 4 << 20, stop: () -> Bool = { false }) -> Int {
    guard let base = buffer.baseAddress else { return 0 }
    var offset = 0
    while offset < buffer.count, !stop() {
        let n = min(piece, buffer.count - offset)
        if ft_populate_write(base + offset, n) != 0 { return offset }
        offset += n
    }
    return offset
}

