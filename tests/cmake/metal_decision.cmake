# Drives cmake/MetalToolchain.cmake in script mode (tests/test_build_config.py):
#   cmake -DMODULE=... -DMFS_XCRUN=... -DREQUIRE=ON|OFF -P metal_decision.cmake
include(${MODULE})
mfs_metal_toolchain(found reason)
mfs_metal_decision("${found}" "${reason}" "${REQUIRE}" mode)
message(STATUS "MODE=${mode}")
message(STATUS "TARGET=${MFS_METAL_DEPLOYMENT_TARGET} LANGUAGE=${MFS_METAL_LANGUAGE}")
