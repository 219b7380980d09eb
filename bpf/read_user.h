// read_user(): bpf_probe_read_user() behind one call site per program. BCC's front end looks
// the helper up in /proc/kallsyms at each call site of it in the source (~40 ms here): with
// its 13 call sites, that was most of tls.c's compile time at every start.
static __always_inline long read_user(void *dst, u32 size, const void *src)
{
    return bpf_probe_read_user(dst, size, src);
}
