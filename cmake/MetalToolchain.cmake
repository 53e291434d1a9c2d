# Whether the Metal compiler is there, and what the build does without it.
#
# The `metal` compiler is not part of Apple's Command Line Tools, and Xcode 26
# ships it as a separate download, so an MLX built with Metal does not mean
# this machine can compile .metal files. mfs_metal_toolchain() probes it once;
# mfs_metal_decision() turns the probe into the build's choice. Both run in
# CMake's script mode too (tests/test_build_config.py drives them with a fake
# xcrun on Linux).

# The deployment target and language of the metallib: MLX's own minimum
# (macOS 14, whose Metal 3.1 has bfloat). Without them `xcrun metal` stamps
# the library for the SDK's macOS (newer than a user's, which then refuses to
# load it), or, with a low MACOSX_DEPLOYMENT_TARGET, drops below Metal 3.1.
set(MFS_METAL_DEPLOYMENT_TARGET 14.0)
set(MFS_METAL_LANGUAGE -std=metal3.1)

set(MFS_METAL_TOOLCHAIN_FIXES
    "Install Xcode and select it (sudo xcode-select -s /Applications/Xcode.app), \
then download its Metal toolchain (xcodebuild -downloadComponent MetalToolchain), \
and reinstall mlx-fused-sgd.")

# Sets FOUND_VAR to TRUE when `xcrun -sdk macosx -f metal` finds the Metal
# compiler, else FALSE and REASON_VAR to what xcrun said. MFS_XCRUN names the
# xcrun to run (default: xcrun on the PATH).
function(mfs_metal_toolchain FOUND_VAR REASON_VAR)
  if(NOT MFS_XCRUN)
    set(MFS_XCRUN xcrun)
  endif()
  execute_process(
    COMMAND ${MFS_XCRUN} -sdk macosx -f metal
    RESULT_VARIABLE _result
    OUTPUT_VARIABLE _out
    ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_STRIP_TRAILING_WHITESPACE
    TIMEOUT 30)
  if(_result STREQUAL "0" AND NOT _out STREQUAL "")
    set(${FOUND_VAR} TRUE PARENT_SCOPE)
    set(${REASON_VAR} "" PARENT_SCOPE)
  else()
    if(_err STREQUAL "")
      set(_err "exit status ${_result}")
    endif()
    set(${FOUND_VAR} FALSE PARENT_SCOPE)
    set(${REASON_VAR} "xcrun cannot find the Metal compiler (${_err})"
        PARENT_SCOPE)
  endif()
endfunction()

# Sets MODE_VAR to "metallib" (build the Metal kernels) or "no-metallib" (a
# warning: GPU streams will use the composed fallback); stops the configure
# with an error instead when REQUIRE (MFS_REQUIRE_METAL) is on.
function(mfs_metal_decision FOUND REASON REQUIRE MODE_VAR)
  if(FOUND)
    set(${MODE_VAR} metallib PARENT_SCOPE)
    return()
  endif()
  set(_message
      "mlx-fused-sgd: ${REASON}. Building without the Metal kernels: on the \
GPU the update will run as a slower composition of stock MLX ops \
(mlx_fused_sgd.backend_info() says so). ${MFS_METAL_TOOLCHAIN_FIXES}")
  if(REQUIRE)
    message(FATAL_ERROR "${_message} (MFS_REQUIRE_METAL is ON.)")
  endif()
  message(WARNING "${_message}")
  set(${MODE_VAR} no-metallib PARENT_SCOPE)
endfunction()
