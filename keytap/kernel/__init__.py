"""The kernel side: BPF loading, TC attachment, BTF, and the record layouts shared with bpf/."""
