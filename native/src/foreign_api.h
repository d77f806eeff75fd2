// Declarations of the few NCCL, cuBLAS, NVML and UCX entry points Tandem resolves with dlsym. Their C
// ABIs are stable across the versions Tandem supports (NCCL 2.x, cuBLAS 12/13, NVML 11+, UCX 1.x).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>

extern "C" {

// NCCL
typedef int (*PFN_ncclGetVersion)(int* version);  // ncclResult_t; version = major*10000+minor*100+patch

// cuBLAS / cuBLASLt
typedef int (*PFN_cublasGetProperty)(int type, int* value);  // libraryPropertyType: 0 major, 1 minor, 2 patch
typedef size_t (*PFN_cublasLtGetVersion)(void);

// NVML
typedef int nvmlReturn_t;
typedef struct nvmlDevice_st* nvmlDevice_t;
enum : int { NVML_SUCCESS = 0, NVML_ERROR_INVALID_ARGUMENT = 2, NVML_ERROR_NOT_SUPPORTED = 3 };
constexpr unsigned kNvmlMaxLinks = 18;
struct nvmlPciInfo_t {
  char busIdLegacy[16];
  unsigned int domain;
  unsigned int bus;
  unsigned int device;
  unsigned int pciDeviceId;
  unsigned int pciSubSystemId;
  char busId[32];
  char reserved[64];  // room for fields a newer NVML might append
};
typedef nvmlReturn_t (*PFN_nvmlInit_v2)(void);
typedef nvmlReturn_t (*PFN_nvmlShutdown)(void);
typedef const char* (*PFN_nvmlErrorString)(nvmlReturn_t);
typedef nvmlReturn_t (*PFN_nvmlDeviceGetHandleByPciBusId_v2)(const char* busId, nvmlDevice_t* device);
typedef nvmlReturn_t (*PFN_nvmlDeviceGetNvLinkState)(nvmlDevice_t, unsigned link, int* isActive);
typedef nvmlReturn_t (*PFN_nvmlDeviceGetNvLinkVersion)(nvmlDevice_t, unsigned link, unsigned* version);
// nvmlIntNvLinkDeviceType_t: 0 GPU, 1 IBM NPU, 2 NVSwitch, 0xFF unknown.
enum : int { NVML_NVLINK_DEVICE_TYPE_GPU = 0, NVML_NVLINK_DEVICE_TYPE_SWITCH = 2 };
typedef nvmlReturn_t (*PFN_nvmlDeviceGetNvLinkRemoteDeviceType)(nvmlDevice_t, unsigned link, int* type);
typedef nvmlReturn_t (*PFN_nvmlDeviceGetNvLinkRemotePciInfo_v2)(nvmlDevice_t, unsigned link,
                                                                 nvmlPciInfo_t* pci);

// UCX (ucp)
typedef int ucs_status_t;
typedef struct ucp_context* ucp_context_h;
typedef struct ucp_config ucp_config_t;
typedef void (*PFN_ucp_get_version)(unsigned* major, unsigned* minor, unsigned* release);
typedef ucs_status_t (*PFN_ucp_config_read)(const char* envPrefix, const char* filename,
                                            ucp_config_t** config);
typedef void (*PFN_ucp_config_release)(ucp_config_t* config);
typedef ucs_status_t (*PFN_ucp_init_version)(unsigned apiMajor, unsigned apiMinor, const void* params,
                                             const ucp_config_t* config, ucp_context_h* context);
typedef void (*PFN_ucp_cleanup)(ucp_context_h context);
typedef void (*PFN_ucp_context_print_info)(ucp_context_h context, FILE* stream);
typedef const char* (*PFN_ucs_status_string)(ucs_status_t status);
constexpr uint64_t kUcpParamFieldFeatures = 1ull << 0;
constexpr uint64_t kUcpFeatureTag = 1ull << 0;
constexpr uint64_t kUcpFeatureRma = 1ull << 1;

}  // extern "C"
