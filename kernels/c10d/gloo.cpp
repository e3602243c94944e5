// The only translation unit that sees ProcessGroupGloo.hpp, and through it <gloo/...>, which the
// torch wheel does not ship: gloo_stub/ declares the few names the header mentions. This unit
// must define no gloo symbol (build.rs checks with nm): it only calls what libtorch_cpu exports
// (Options, createDevice*, the ProcessGroupGloo constructor) and allocates ProcessGroupGloo and
// its Options, whose layouts hold gloo types only behind shared_ptr.
#include "internal.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <cstdlib>
#include <cstring>

namespace dl_c10d {

c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                            int size, const std::string& hostname,
                                            std::chrono::milliseconds timeout) {
  // The steps of the ProcessGroupGloo(store, rank, size, timeout) binding in torch's
  // csrc/distributed/c10d/init.cpp, so that the group behaves as torch.distributed's.
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  const bool lazy = c10d::getDefaultGlooLazyInit();
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (!hostname.empty()) {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname, lazy));
  } else if (ifname && std::strlen(ifname) > 1) {
    for (const auto& iface : c10d::split(',', ifname))
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface, lazy));
  } else {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice(lazy));
  }
  opts->threads = static_cast<int>(opts->devices.size()) * 2;
  auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
  backend->setSequenceNumberForGroup();
  return backend;
}

}  // namespace dl_c10d
