/* FNV-1a 64, the one hash of the extension and the shepherd: the inherited-state fingerprints
 * (fingerprint.c, shepherd.c's own_state), a cgroup's extended attribute names (cgroup.c) and
 * the keys of kept cgroups' paths (pool.c). Not for anything an attacker picks to collide. */
#ifndef RETEST_FNV_H
#define RETEST_FNV_H

#include <stddef.h>
#include <stdint.h>

#define PG_FNV_OFFSET 14695981039346656037ULL

/* Mix n bytes at p into the hash *h (start it at PG_FNV_OFFSET). */
static inline void pg_fnv_mix(uint64_t *h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        *h ^= b[i];
        *h *= 1099511628211ULL;
    }
}

#endif
