//! `kiln-vmm`: the VMM process kiln starts for each VM on the kvm backend
//! (see `kiln_vmm::process`). Not meant to be run by hand.

fn main() -> std::process::ExitCode {
    kiln_vmm::process::child_main()
}
