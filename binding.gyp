{
  "targets": [
    {
      "target_name": "tandem",
      "sources": [
        "native/src/addon.cpp",
        "native/src/addon_state.cpp",
        "native/src/cuda_device.cpp",
        "native/src/cuda_driver.cpp",
        "native/src/device_buffer.cpp",
        "native/src/dynlib.cpp",
        "native/src/engine/cpu_kernels.cpp",
        "native/src/engine/cpu_llama.cpp",
        "native/src/engine/cpu_moe.cpp",
        "native/src/engine/cpu_parallel.cpp",
        "native/src/engine/cublas.cpp",
        "native/src/engine/cuda_llama.cpp",
        "native/src/engine/cuda_llama_graphs.cpp",
        "native/src/engine/cuda_llama_nccl.cpp",
        "native/src/engine/cuda_llama_tp.cpp",
        "native/src/engine/cuda_llama_pp.cpp",
        "native/src/engine/cuda_llama_wrap.cpp",
        "native/src/engine/cuda_moe.cpp",
        "native/src/engine/engine_wrap.cpp",
        "native/src/engine/gemm_bench.cpp",
        "native/src/engine/llama_common.cpp",
        "native/src/nccl/comm_wrap.cpp",
        "native/src/nccl/communicator.cpp",
        "native/src/nccl/nccl_library.cpp",
        "native/src/probe.cpp",
        "native/src/transfer/agent.cpp",
        "native/src/transfer/agent_wrap.cpp",
        "native/src/transfer/auth.cpp",
        "native/src/transfer/backends/cuda_ipc.cpp",
        "native/src/transfer/backends/nccl.cpp",
        "native/src/transfer/backends/shm.cpp",
        "native/src/transfer/backends/tcp.cpp",
        "native/src/transfer/backends/ucx.cpp",
        "native/src/transfer/backends/ucx_worker.cpp",
        "native/src/transfer/cuda_state.cpp",
        "native/src/transfer/metadata.cpp",
        "native/src/transfer/notify_ring.cpp",
        "native/src/transfer/wire.cpp",
        "native/src/work_queue.cpp"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": [
        "NAPI_VERSION=9",
        "NAPI_CPP_EXCEPTIONS",
        "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS",
        "TANDEM_ADDON_VERSION=\"<!(node -p \"require('./package.json').version\")\""
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"],
      "libraries": ["-ldl", "-lpthread"],
      "conditions": [
        ["OS=='mac'", {
          "xcode_settings": {
            "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
            "CLANG_CXX_LANGUAGE_STANDARD": "c++17"
          }
        }]
      ]
    }
  ]
}
