// The slice of NCCL's C API that Tandem calls, declared here so that the addon builds without nccl.h
// and links no NCCL library: every entry point is resolved with dlsym at first use (nccl_library.cpp).
//
// Transcribed from NCCL 2.28.3's src/nccl.h.in. The ABI is stable across NCCL 2.x: the enums are C
// enums (int-sized), ncclUniqueId is 128 bytes passed by value, and ncclConfig_t carries its own size
// and version, so a library older than the layout below reads only the fields it knows
// (parseCommConfig copies min(config->size, sizeof its own struct) bytes and checks `version`).
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>

#include "../cuda_api.h"

namespace tandem::nccl {

extern "C" {

typedef struct ncclComm* ncclComm_t;

constexpr size_t kUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES
struct ncclUniqueId {
  char internal[kUniqueIdBytes];
};
static_assert(sizeof(ncclUniqueId) == 128, "ncclUniqueId is 128 bytes");

typedef int ncclResult_t;
enum : int {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
  ncclNumResults = 8,
};

typedef int ncclRedOp_t;
enum : int { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4, ncclNumOps = 5 };

typedef int ncclDataType_t;
enum : int {
  ncclInt8 = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9,
  ncclFloat8e4m3 = 10,  // NCCL 2.24 and newer
  ncclFloat8e5m2 = 11,  // NCCL 2.24 and newer
  ncclNumTypes = 12,
};

constexpr int kConfigUndefInt = INT_MIN;  // NCCL_CONFIG_UNDEF_INT
constexpr int kSplitNoColor = -1;         // NCCL_SPLIT_NOCOLOR
constexpr unsigned kConfigMagic = 0xcafebeef;
constexpr unsigned kConfigVersion = 22800;  // NCCL_VERSION(2, 28, 0): the layout below (ncclConfig_v22800)

// ncclConfig_v22800. Initialise with makeConfig(), never by hand: NCCL rejects a config whose magic is
// wrong and treats INT_MIN / NULL as "use the default".
struct ncclConfig_t {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
  int cgaClusterSize;
  int minCTAs;
  int maxCTAs;
  const char* netName;
  int splitShare;
  int trafficClass;
  const char* commName;
  int collnetEnable;
  int CTAPolicy;
  int shrinkShare;
  int nvlsCTAs;
  int nChannelsPerNetPeer;
  int nvlinkCentricSched;
};
static_assert(sizeof(ncclConfig_t) == 80, "ncclConfig_v22800 is 80 bytes on LP64");
static_assert(offsetof(ncclConfig_t, blocking) == 16, "ncclConfig_t.blocking offset");
static_assert(offsetof(ncclConfig_t, netName) == 32, "ncclConfig_t.netName offset");
static_assert(offsetof(ncclConfig_t, splitShare) == 40, "ncclConfig_t.splitShare offset");
static_assert(offsetof(ncclConfig_t, commName) == 48, "ncclConfig_t.commName offset");
static_assert(offsetof(ncclConfig_t, nvlinkCentricSched) == 76, "ncclConfig_t.nvlinkCentricSched offset");

typedef ncclResult_t (*PFN_ncclGetVersion)(int* version);
typedef ncclResult_t (*PFN_ncclGetUniqueId)(ncclUniqueId* uniqueId);
typedef ncclResult_t (*PFN_ncclCommInitRankConfig)(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank,
                                                   ncclConfig_t* config);
typedef ncclResult_t (*PFN_ncclCommSplit)(ncclComm_t comm, int color, int key, ncclComm_t* newcomm,
                                          ncclConfig_t* config);
typedef ncclResult_t (*PFN_ncclCommAbort)(ncclComm_t comm);
typedef ncclResult_t (*PFN_ncclCommDestroy)(ncclComm_t comm);
typedef ncclResult_t (*PFN_ncclCommGetAsyncError)(ncclComm_t comm, ncclResult_t* asyncError);
typedef ncclResult_t (*PFN_ncclCommCount)(const ncclComm_t comm, int* count);
typedef ncclResult_t (*PFN_ncclCommUserRank)(const ncclComm_t comm, int* rank);
typedef ncclResult_t (*PFN_ncclGroupStart)(void);
typedef ncclResult_t (*PFN_ncclGroupEnd)(void);
typedef ncclResult_t (*PFN_ncclAllReduce)(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                          ncclRedOp_t op, ncclComm_t comm, CUstream stream);
typedef ncclResult_t (*PFN_ncclAllGather)(const void* sendbuff, void* recvbuff, size_t sendcount,
                                          ncclDataType_t datatype, ncclComm_t comm, CUstream stream);
typedef ncclResult_t (*PFN_ncclReduceScatter)(const void* sendbuff, void* recvbuff, size_t recvcount,
                                              ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                                              CUstream stream);
typedef ncclResult_t (*PFN_ncclBroadcast)(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                          int root, ncclComm_t comm, CUstream stream);
typedef ncclResult_t (*PFN_ncclReduce)(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                       ncclRedOp_t op, int root, ncclComm_t comm, CUstream stream);
typedef ncclResult_t (*PFN_ncclSend)(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
                                     ncclComm_t comm, CUstream stream);
typedef ncclResult_t (*PFN_ncclRecv)(void* recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                                     CUstream stream);
typedef const char* (*PFN_ncclGetErrorString)(ncclResult_t result);
typedef const char* (*PFN_ncclGetLastError)(ncclComm_t comm);

}  // extern "C"

// A config with every attribute at NCCL's default (NCCL_CONFIG_INITIALIZER), then `blocking` set.
inline ncclConfig_t makeConfig(bool blocking, const char* commName) {
  ncclConfig_t c;
  c.size = sizeof(ncclConfig_t);
  c.magic = kConfigMagic;
  c.version = kConfigVersion;
  c.blocking = blocking ? 1 : 0;
  c.cgaClusterSize = kConfigUndefInt;
  c.minCTAs = kConfigUndefInt;
  c.maxCTAs = kConfigUndefInt;
  c.netName = nullptr;
  c.splitShare = kConfigUndefInt;
  c.trafficClass = kConfigUndefInt;
  c.commName = commName;
  c.collnetEnable = kConfigUndefInt;
  c.CTAPolicy = kConfigUndefInt;
  c.shrinkShare = kConfigUndefInt;
  c.nvlsCTAs = kConfigUndefInt;
  c.nChannelsPerNetPeer = kConfigUndefInt;
  c.nvlinkCentricSched = kConfigUndefInt;
  return c;
}

}  // namespace tandem::nccl
