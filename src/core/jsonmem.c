#include "fleetml/jsonmem.h"

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

/* Big enough for jansson's tree of a 128 KiB payload; beyond it allocations
 * simply fall back to the heap. */
#define ARENA_BYTES (4u * 1024 * 1024)

typedef struct arena {
    unsigned char *buf;
    size_t used;
    int active;
} arena;

static _Thread_local arena tl;
static pthread_key_t release_key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

/* Frees a thread's arena when the thread exits. */
static void release(void *buf) { fm_free(buf); }
static void make_key(void) { (void)pthread_key_create(&release_key, release); }

static int in_arena(const void *p)
{
    const unsigned char *c = p;
    return tl.buf && c >= tl.buf && c < tl.buf + ARENA_BYTES;
}

static void *arena_malloc(size_t n)
{
    if (tl.active) {
        size_t need = (n + 15) & ~(size_t)15;
        if (need <= ARENA_BYTES - tl.used) {
            void *p = tl.buf + tl.used;
            tl.used += need;
            return p;
        }
    }
    return fm_malloc(n);
}

static void arena_free(void *p)
{
    /* Arena memory is released all at once when the scope ends. A pointer
     * from another thread's arena never reaches here: values created in a
     * scope are freed in it (see the header's rule). */
    if (!in_arena(p))
        fm_free(p);
}

static _Atomic int installed;

static void install_once(void)
{
    json_set_alloc_funcs(arena_malloc, arena_free);
    installed = 1;
}

void fm_jsonmem_install(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, install_once);
}

void fm_jsonmem_begin(void)
{
    /* Without the allocator installed jansson never calls arena_malloc;
     * do not reserve memory for nothing (unit tests, fuzzers). */
    if (!installed)
        return;
    if (!tl.buf) {
        pthread_once(&key_once, make_key);
        tl.buf = fm_malloc(ARENA_BYTES);
        if (!tl.buf)
            return; /* no arena: the heap serves */
        (void)pthread_setspecific(release_key, tl.buf);
    }
    tl.used = 0;
    tl.active = 1;
}

void fm_jsonmem_end(void)
{
    tl.active = 0;
    tl.used = 0;
}
