#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_vmm::kvm::devices::virtio::fuzzing::net(data));
