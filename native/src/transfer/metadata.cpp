#include "metadata.h"

#include <cstring>

#include "wire.h"

namespace tandem::transfer {
namespace {

constexpr char kMagic[8] = {'T', 'N', 'D', 'M', 'A', 'G', 'N', 'T'};

uint32_t crc32(const unsigned char* data, size_t size) {
  static uint32_t table[256];
  static bool ready = false;
  if (!ready) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    ready = true;
  }
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ data[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

class Writer {
 public:
  template <typename T>
  void put(T value) {
    const auto* p = reinterpret_cast<const unsigned char*>(&value);
    out.insert(out.end(), p, p + sizeof(T));
  }
  void bytes(const void* data, size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    out.insert(out.end(), p, p + size);
  }
  void blob(const std::vector<uint8_t>& b) {
    put<uint32_t>(static_cast<uint32_t>(b.size()));
    bytes(b.data(), b.size());
  }
  void str(const std::string& s) {
    put<uint16_t>(static_cast<uint16_t>(s.size()));
    bytes(s.data(), s.size());
  }
  std::vector<unsigned char> out;
};

class Reader {
 public:
  Reader(const unsigned char* data, size_t size) : data_(data), size_(size) {}
  template <typename T>
  T get(const char* what) {
    T value;
    need(sizeof(T), what);
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  void bytes(void* out, size_t size, const char* what) {
    need(size, what);
    std::memcpy(out, data_ + pos_, size);
    pos_ += size;
  }
  std::string str(const char* what) {
    uint16_t length = get<uint16_t>(what);
    need(length, what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), length);
    pos_ += length;
    return s;
  }
  std::vector<uint8_t> blob(const char* what) {
    uint32_t length = get<uint32_t>(what);
    need(length, what);
    std::vector<uint8_t> b(data_ + pos_, data_ + pos_ + length);
    pos_ += length;
    return b;
  }
  size_t pos() const { return pos_; }

 private:
  void need(size_t n, const char* what) {
    if (n > size_ - pos_) {
      throw MetadataError{"TANDEM_BAD_METADATA", std::string("metadata is truncated (while reading ") + what +
                                                      " at byte " + std::to_string(pos_) + " of " +
                                                      std::to_string(size_) + ")"};
    }
  }
  const unsigned char* data_;
  size_t size_;
  size_t pos_ = 0;
};

}  // namespace

const char* memKindName(MemKind kind) {
  switch (kind) {
    case MemKind::Host: return "host";
    case MemKind::Shared: return "shared";
    case MemKind::Pinned: return "pinned";
    case MemKind::Device: return "device";
  }
  return "unknown";
}

uint64_t compatHash() {
  // FNV-1a over what both ends must agree on: wire version, header and descriptor layout.
  std::string basis = "tandem-transfer;wire=" + std::to_string(kWireVersion) + ";header=" +
                      std::to_string(sizeof(Header)) + ";metadata=" + std::to_string(kMetadataFormat) +
                      ";kinds=4;ipc=64;ucx=1";
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : basis) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::vector<unsigned char> encodeMetadata(const AgentDescriptor& a) {
  Writer w;
  w.bytes(kMagic, sizeof(kMagic));
  w.put<uint16_t>(kMetadataFormat);
  w.put<uint16_t>(0);
  w.put<uint32_t>(0);  // total length, patched below
  w.put<uint64_t>(compatHash());
  w.put<uint64_t>(a.incarnation);
  w.put<uint64_t>(a.generation);
  w.put<uint32_t>(a.pid);
  w.str(a.name);
  w.str(a.hostKey);
  w.str(a.unixSocket);
  w.str(a.tcpHost);
  w.put<uint16_t>(a.tcpPort);
  w.put<uint32_t>(a.backends);
  w.blob(a.ucxAddress);
  w.put<uint32_t>(static_cast<uint32_t>(a.regions.size()));
  for (const auto& r : a.regions) {
    w.put<uint32_t>(r.id);
    w.put<uint8_t>(static_cast<uint8_t>(r.kind));
    w.put<uint8_t>(r.hasIpcHandle ? 1 : 0);
    w.put<int16_t>(r.device);
    w.put<uint64_t>(r.size);
    w.put<uint64_t>(r.address);
    w.put<int32_t>(r.memfd);
    w.put<uint64_t>(r.inode);
    w.put<uint64_t>(r.fileDevice);
    w.put<uint64_t>(r.ipcOffset);
    w.bytes(r.ipcHandle, sizeof(r.ipcHandle));
    w.blob(r.ucxRkey);
  }
  uint32_t total = static_cast<uint32_t>(w.out.size() + sizeof(uint32_t));
  std::memcpy(w.out.data() + 12, &total, sizeof(total));
  w.put<uint32_t>(crc32(w.out.data(), w.out.size()));
  return w.out;
}

AgentDescriptor decodeMetadata(const unsigned char* data, size_t size) {
  if (size < 28 || std::memcmp(data, kMagic, sizeof(kMagic)) != 0) {
    throw MetadataError{"TANDEM_BAD_METADATA", "not Tandem agent metadata (bad magic or too short: " +
                                                   std::to_string(size) + " bytes)"};
  }
  Reader r(data, size);
  char magic[8];
  r.bytes(magic, 8, "magic");
  uint16_t format = r.get<uint16_t>("format");
  r.get<uint16_t>("reserved");
  uint32_t total = r.get<uint32_t>("length");
  // Length and checksum first (their place is the same in every format): only an intact blob can say
  // that it comes from another build. Checked the other way round, a corrupt blob whose format bytes
  // happened to differ was reported as incompatible.
  if (total != size) {
    throw MetadataError{"TANDEM_BAD_METADATA", "metadata length field says " + std::to_string(total) +
                                                   " bytes but " + std::to_string(size) + " were given (truncated?)"};
  }
  uint32_t storedCrc;
  std::memcpy(&storedCrc, data + size - 4, 4);
  if (crc32(data, size - 4) != storedCrc) {
    throw MetadataError{"TANDEM_BAD_METADATA", "metadata checksum mismatch (corrupted in transit?)"};
  }
  if (format != kMetadataFormat) {
    throw MetadataError{"TANDEM_INCOMPATIBLE_METADATA", "metadata format " + std::to_string(format) +
                                                            " is not supported (this build reads format " +
                                                            std::to_string(kMetadataFormat) + ")"};
  }
  uint64_t hash = r.get<uint64_t>("compat hash");
  if (hash != compatHash()) {
    throw MetadataError{"TANDEM_INCOMPATIBLE_METADATA",
                        "metadata comes from an incompatible Tandem build (compatibility hash differs)"};
  }
  AgentDescriptor a;
  a.incarnation = r.get<uint64_t>("incarnation");
  a.generation = r.get<uint64_t>("generation");
  a.pid = r.get<uint32_t>("pid");
  a.name = r.str("name");
  a.hostKey = r.str("host key");
  a.unixSocket = r.str("unix socket");
  a.tcpHost = r.str("tcp host");
  a.tcpPort = r.get<uint16_t>("tcp port");
  a.backends = r.get<uint32_t>("backends");
  a.ucxAddress = r.blob("ucx worker address");
  uint32_t count = r.get<uint32_t>("region count");
  if (count > (size / 40)) throw MetadataError{"TANDEM_BAD_METADATA", "metadata region count is implausible"};
  for (uint32_t i = 0; i < count; ++i) {
    RegionDescriptor d;
    d.id = r.get<uint32_t>("region id");
    uint8_t kind = r.get<uint8_t>("region kind");
    if (kind > static_cast<uint8_t>(MemKind::Device)) {
      throw MetadataError{"TANDEM_BAD_METADATA", "region " + std::to_string(d.id) + " has unknown kind " + std::to_string(kind)};
    }
    d.kind = static_cast<MemKind>(kind);
    d.hasIpcHandle = r.get<uint8_t>("region flags") & 1;
    d.device = r.get<int16_t>("region device");
    d.size = r.get<uint64_t>("region size");
    d.address = r.get<uint64_t>("region address");
    d.memfd = r.get<int32_t>("region memfd");
    d.inode = r.get<uint64_t>("region memfd inode");
    d.fileDevice = r.get<uint64_t>("region memfd device");
    d.ipcOffset = r.get<uint64_t>("region ipc offset");
    r.bytes(d.ipcHandle, sizeof(d.ipcHandle), "region ipc handle");
    d.ucxRkey = r.blob("region ucx rkey");
    a.regions.push_back(d);
  }
  if (r.pos() != size - 4) throw MetadataError{"TANDEM_BAD_METADATA", "metadata has trailing bytes"};
  if (a.name.empty()) throw MetadataError{"TANDEM_BAD_METADATA", "metadata names no agent"};
  return a;
}

}  // namespace tandem::transfer
