// The slice of the CUDA driver API that Tandem calls, declared here so that the addon builds without
// CUDA headers and links no CUDA library. The driver's C ABI is stable; every entry point is fetched at
// run time with cuGetProcAddress at an explicit API version (see cuda_driver.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st* CUcontext;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
typedef struct CUevent_st* CUevent;
typedef struct CUgraph_st* CUgraph;
typedef struct CUgraphExec_st* CUgraphExec;
typedef uint64_t cuuint64_t;

// driver_types.h (CUDA runtime headers, included first by bench/micro/gemm.cu) defines the same 16 bytes.
#ifndef CU_UUID_HAS_BEEN_DEFINED
#define CU_UUID_HAS_BEEN_DEFINED
struct CUuuid {
  unsigned char bytes[16];
};
#endif

enum : int {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_NOT_READY = 600,
};

// CUdevice_attribute values used by Tandem.
enum : int {
  CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
  CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33,
  CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34,
  CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE = 36,
  CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH = 37,
  CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38,
  CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING = 41,
  CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50,
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
  CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102,
  CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103,
};

// CUdevice_P2PAttribute values.
enum : int {
  CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK = 0x01,
  CU_DEVICE_P2P_ATTRIBUTE_ACCESS_SUPPORTED = 0x02,
  CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED = 0x03,
};

enum : unsigned {
  CU_STREAM_NON_BLOCKING = 0x1,
  CU_EVENT_DISABLE_TIMING = 0x2,
  CU_MEMHOSTALLOC_PORTABLE = 0x1,
  CU_MEMHOSTREGISTER_PORTABLE = 0x1,
  CU_MEMHOSTREGISTER_DEVICEMAP = 0x2,
  CU_STREAM_WRITE_VALUE_DEFAULT = 0x0,  // with a memory fence before the write
};

struct CUipcMemHandle {
  unsigned char reserved[64];
};

enum : int {
  CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2,
  CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9,
  CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10,
  CU_MEMORYTYPE_HOST = 1,
  CU_MEMORYTYPE_DEVICE = 2,
  CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1,
};

typedef CUresult (*PFN_cuGetProcAddress_v2)(const char* symbol, void** pfn, int cudaVersion,
                                             cuuint64_t flags, int* symbolStatus);
typedef CUresult (*PFN_cuGetProcAddress_v1)(const char* symbol, void** pfn, int cudaVersion,
                                             cuuint64_t flags);
typedef CUresult (*PFN_cuInit)(unsigned int flags);
typedef CUresult (*PFN_cuDriverGetVersion)(int* version);
typedef CUresult (*PFN_cuGetErrorName)(CUresult error, const char** str);
typedef CUresult (*PFN_cuGetErrorString)(CUresult error, const char** str);
typedef CUresult (*PFN_cuDeviceGetCount)(int* count);
typedef CUresult (*PFN_cuDeviceGet)(CUdevice* device, int ordinal);
typedef CUresult (*PFN_cuDeviceGetName)(char* name, int len, CUdevice dev);
typedef CUresult (*PFN_cuDeviceTotalMem)(size_t* bytes, CUdevice dev);
typedef CUresult (*PFN_cuDeviceGetAttribute)(int* value, int attrib, CUdevice dev);
typedef CUresult (*PFN_cuDeviceGetUuid)(CUuuid* uuid, CUdevice dev);
typedef CUresult (*PFN_cuDeviceGetPCIBusId)(char* pciBusId, int len, CUdevice dev);
typedef CUresult (*PFN_cuDeviceCanAccessPeer)(int* canAccessPeer, CUdevice dev, CUdevice peerDev);
typedef CUresult (*PFN_cuDeviceGetP2PAttribute)(int* value, int attrib, CUdevice src, CUdevice dst);
typedef CUresult (*PFN_cuDevicePrimaryCtxRetain)(CUcontext* pctx, CUdevice dev);
typedef CUresult (*PFN_cuDevicePrimaryCtxRelease)(CUdevice dev);
typedef CUresult (*PFN_cuCtxSetCurrent)(CUcontext ctx);
typedef CUresult (*PFN_cuCtxPushCurrent)(CUcontext ctx);
typedef CUresult (*PFN_cuCtxPopCurrent)(CUcontext* pctx);
typedef CUresult (*PFN_cuCtxSynchronize)(void);
typedef CUresult (*PFN_cuMemGetInfo)(size_t* free, size_t* total);
typedef CUresult (*PFN_cuMemAlloc)(CUdeviceptr* dptr, size_t bytesize);
typedef CUresult (*PFN_cuMemFree)(CUdeviceptr dptr);
typedef CUresult (*PFN_cuMemAllocHost)(void** pp, size_t bytesize);
typedef CUresult (*PFN_cuMemFreeHost)(void* p);
typedef CUresult (*PFN_cuMemHostRegister)(void* p, size_t bytesize, unsigned int flags);
typedef CUresult (*PFN_cuMemHostUnregister)(void* p);
typedef CUresult (*PFN_cuMemHostGetDevicePointer)(CUdeviceptr* dptr, void* p, unsigned int flags);
typedef CUresult (*PFN_cuStreamWriteValue32)(CUstream stream, CUdeviceptr addr, uint32_t value, unsigned int flags);
typedef CUresult (*PFN_cuMemcpyHtoDAsync)(CUdeviceptr dst, const void* src, size_t bytes, CUstream s);
typedef CUresult (*PFN_cuMemcpyDtoHAsync)(void* dst, CUdeviceptr src, size_t bytes, CUstream s);
typedef CUresult (*PFN_cuMemcpyDtoDAsync)(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s);
typedef CUresult (*PFN_cuMemcpyPeerAsync)(CUdeviceptr dst, CUcontext dstCtx, CUdeviceptr src,
                                          CUcontext srcCtx, size_t bytes, CUstream s);
typedef CUresult (*PFN_cuMemcpyAsync)(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s);
typedef CUresult (*PFN_cuMemsetD8Async)(CUdeviceptr dst, unsigned char value, size_t n, CUstream s);
typedef CUresult (*PFN_cuStreamCreate)(CUstream* stream, unsigned int flags);
typedef CUresult (*PFN_cuStreamDestroy)(CUstream stream);
typedef CUresult (*PFN_cuStreamSynchronize)(CUstream stream);
typedef CUresult (*PFN_cuEventCreate)(CUevent* event, unsigned int flags);
typedef CUresult (*PFN_cuStreamWaitEvent)(CUstream stream, CUevent event, unsigned int flags);
typedef CUresult (*PFN_cuEventDestroy)(CUevent event);
typedef CUresult (*PFN_cuEventRecord)(CUevent event, CUstream stream);
typedef CUresult (*PFN_cuEventSynchronize)(CUevent event);
typedef CUresult (*PFN_cuEventElapsedTime)(float* ms, CUevent start, CUevent end);
typedef CUresult (*PFN_cuModuleLoadData)(CUmodule* module, const void* image);
typedef CUresult (*PFN_cuModuleUnload)(CUmodule module);
typedef CUresult (*PFN_cuModuleGetFunction)(CUfunction* fn, CUmodule module, const char* name);
typedef CUresult (*PFN_cuIpcGetMemHandle)(CUipcMemHandle* handle, CUdeviceptr dptr);
typedef CUresult (*PFN_cuIpcOpenMemHandle)(CUdeviceptr* dptr, CUipcMemHandle handle, unsigned int flags);
typedef CUresult (*PFN_cuIpcCloseMemHandle)(CUdeviceptr dptr);
typedef CUresult (*PFN_cuMemGetAddressRange)(CUdeviceptr* base, size_t* size, CUdeviceptr dptr);
typedef CUresult (*PFN_cuPointerGetAttribute)(void* data, int attribute, CUdeviceptr ptr);
typedef CUresult (*PFN_cuEventQuery)(CUevent event);
typedef CUresult (*PFN_cuCtxEnablePeerAccess)(CUcontext peerContext, unsigned int flags);
typedef CUresult (*PFN_cuLaunchKernel)(CUfunction f, unsigned gridX, unsigned gridY, unsigned gridZ,
                                       unsigned blockX, unsigned blockY, unsigned blockZ,
                                       unsigned sharedMemBytes, CUstream stream, void** kernelParams,
                                       void** extra);
// cuLaunchKernelEx and its attributes (cuda.h's CUlaunchConfig / CUlaunchAttribute layout). Programmatic stream
// serialization (Hopper's programmatic dependent launch): the kernel may start before the previous one on the
// stream has finished, and must execute griddepcontrol.wait before it touches what that one writes.
enum : int { CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6 };
union CUlaunchAttributeValue {
  char pad[64];
  int programmaticStreamSerializationAllowed;
  unsigned long long align;  // the driver's union holds pointers: 8-byte aligned
};
struct CUlaunchAttribute {
  int id;  // CUlaunchAttributeID
  char pad[8 - sizeof(int)];
  CUlaunchAttributeValue value;
};
struct CUlaunchConfig {
  unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
  CUstream hStream;
  CUlaunchAttribute* attrs;
  unsigned numAttrs;
};
typedef CUresult (*PFN_cuLaunchKernelEx)(const CUlaunchConfig* config, CUfunction f, void** kernelParams, void** extra);
// CUfunction_attribute: a kernel may use more than 48 KiB of dynamic shared memory only once raised.
enum : int { CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8 };
// ... and the share of L1 / shared memory it prefers, in percent of the most shared memory.
enum : int { CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9 };
typedef CUresult (*PFN_cuFuncSetAttribute)(CUfunction f, int attrib, int value);
// Stream capture into CUDA graphs (CUstreamCaptureMode: 0 global, 1 thread-local, 2 relaxed).
enum : int { CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1 };
typedef CUresult (*PFN_cuStreamBeginCapture)(CUstream stream, int mode);
typedef CUresult (*PFN_cuStreamEndCapture)(CUstream stream, CUgraph* graph);
typedef CUresult (*PFN_cuGraphInstantiateWithFlags)(CUgraphExec* exec, CUgraph graph, unsigned long long flags);
typedef CUresult (*PFN_cuGraphLaunch)(CUgraphExec exec, CUstream stream);
typedef CUresult (*PFN_cuGraphExecDestroy)(CUgraphExec exec);
typedef CUresult (*PFN_cuGraphDestroy)(CUgraph graph);

// Batched copies (driver 12.8 and later; optional): the copy engines run a list of copies without the
// per-copy stream bookkeeping that separate cuMemcpyAsync calls cost on the GPU.
struct CUmemLocation {
  int type;  // CUmemLocationType; 0 (invalid) when no hint is given
  int id;
};
struct CUmemcpyAttributes {
  int srcAccessOrder;  // CUmemcpySrcAccessOrder
  CUmemLocation srcLocHint;
  CUmemLocation dstLocHint;
  unsigned int flags;
};
enum : int { CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 0x1 };
// The CUDA 12.8 signature (with failIdx), requested at API version 12080.
// cudaProfiler.h: the range an attached profiler records (ncu --profile-from-start off).
typedef CUresult (*PFN_cuProfilerStart)(void);
typedef CUresult (*PFN_cuProfilerStop)(void);
typedef CUresult (*PFN_cuMemcpyBatchAsync)(CUdeviceptr* dsts, CUdeviceptr* srcs, size_t* sizes, size_t count,
                                           CUmemcpyAttributes* attrs, size_t* attrIdxs, size_t numAttrs,
                                           size_t* failIdx, CUstream stream);

}  // extern "C"
