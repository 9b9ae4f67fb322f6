#!/usr/bin/env bash
# Makes sure wgpu will find an adapter before anything runs on it.
#
# On Linux, wgpu's Vulkan backend needs the loader (libvulkan1) and at least one driver
# (an ICD manifest). When there is none, this installs Mesa's software driver, lavapipe
# (`mesa-vulkan-drivers`), if it can (Debian/Ubuntu, as root or with password-less sudo),
# and otherwise says exactly what to install. Real GPUs' drivers are left alone.
set -euo pipefail

case "$(uname -s)" in
  Linux) ;;
  *) exit 0 ;; # Metal (macOS) and DX12 (Windows) ship with the OS.
esac

have_loader() { ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; }
have_driver() {
  local d
  for d in ${VK_DRIVER_FILES//:/ } ${VK_ICD_FILENAMES//:/ } /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
    if [ -f "$d" ] || compgen -G "$d/*.json" >/dev/null; then return 0; fi
  done
  return 1
}

VK_DRIVER_FILES=${VK_DRIVER_FILES:-}
VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-}
if have_loader && have_driver; then
  exit 0
fi

packages="libvulkan1 mesa-vulkan-drivers"
if command -v apt-get >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  fi
  if [ "$sudo" != "none" ]; then
    echo "ensure-adapter: no Vulkan driver found; installing Mesa's lavapipe ($packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq $packages >/dev/null
    if have_loader && have_driver; then exit 0; fi
  fi
fi

cat >&2 <<MSG
ensure-adapter: no Vulkan adapter is available and this script could not install one.
Install a Vulkan driver and the loader, e.g. on Debian/Ubuntu:
    sudo apt-get install -y $packages
(Fedora: mesa-vulkan-drivers vulkan-loader; Arch: vulkan-swrast vulkan-icd-loader), or your GPU vendor's driver.
MSG
exit 1
