// An agent's metadata blob: what a peer needs to reach it and its registered regions.
//
// Layout (little-endian):  "TNDMAGNT" | u16 format | u16 reserved | u32 total length | u64 compat hash |
//   u64 incarnation | u64 generation | u32 pid | str name | str host key | str unix socket | str tcp host | u16 tcp port |
//   u32 backends | bytes ucx worker address | u32 region count | regions... | u32 crc32 of all before it
// A region: u32 id | u8 kind | u8 flags (1: has IPC handle) | i16 device | u64 size | u64 address |
//   i32 memfd | u64 memfd inode | u64 memfd device | u64 ipc offset | 64-byte CUDA IPC handle |
//   bytes packed UCX rkey
// "bytes" is a u32 length + that many bytes.
// Strings are u16 length + bytes. Parsing checks every length against the blob before reading it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tandem::transfer {

// 2: the region table's generation, and each memfd's inode and device (a peer checks that what it maps
// through /proc/<pid>/fd/<memfd> is still that file).
constexpr uint16_t kMetadataFormat = 2;

enum class MemKind : uint8_t { Host = 0, Shared = 1, Pinned = 2, Device = 3 };
const char* memKindName(MemKind kind);

enum BackendBit : uint32_t {
  kBackendShm = 1u << 0,
  kBackendTcp = 1u << 1,
  kBackendCudaIpc = 1u << 2,
  kBackendNccl = 1u << 3,
  kBackendUcx = 1u << 4,
};

struct RegionDescriptor {
  uint32_t id = 0;
  MemKind kind = MemKind::Host;
  int16_t device = -1;
  uint64_t size = 0;
  uint64_t address = 0;  // in the owner's address space (host pointer, or device pointer)
  int32_t memfd = -1;    // shared/pinned regions: the owner's fd, reachable as /proc/<pid>/fd/<memfd>
  uint64_t inode = 0;       // ... and the file it names (fstat st_ino, st_dev): fd numbers are reused
  uint64_t fileDevice = 0;
  bool hasIpcHandle = false;
  uint64_t ipcOffset = 0;  // address - base of the allocation the IPC handle names
  unsigned char ipcHandle[64] = {0};
  std::vector<uint8_t> ucxRkey;  // packed UCX remote key (host regions, when the agent has UCX)
};

struct AgentDescriptor {
  std::string name;
  uint64_t incarnation = 0;
  // Counts the agent's registrations and deregistrations: of two blobs of one incarnation, the one with
  // the higher generation describes the later region table.
  uint64_t generation = 0;
  uint32_t pid = 0;
  std::string hostKey;
  std::string unixSocket;  // abstract socket name (without the leading NUL)
  std::string tcpHost;
  uint16_t tcpPort = 0;
  uint32_t backends = 0;
  std::vector<uint8_t> ucxAddress;  // UCX worker address, when the agent has UCX
  std::vector<RegionDescriptor> regions;
};

uint64_t compatHash();
std::vector<unsigned char> encodeMetadata(const AgentDescriptor& agent);

// Throws MetadataError with code "TANDEM_BAD_METADATA" (malformed, truncated, corrupt) or
// "TANDEM_INCOMPATIBLE_METADATA" (another format or wire version).
struct MetadataError {
  std::string code;
  std::string message;
};
AgentDescriptor decodeMetadata(const unsigned char* data, size_t size);

}  // namespace tandem::transfer
