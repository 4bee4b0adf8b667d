/* A shared library built without frame pointers (-O2 -fomit-frame-pointer, unwind tables
 * kept, as distributions build theirs), for mixed_app.c: lib_work -> lib_inner -> the
 * application's callback. Each keeps work after its call (no tail call). */
typedef unsigned long (*leaf_fn)(unsigned long);

__attribute__((noinline)) unsigned long lib_inner(leaf_fn leaf, unsigned long n)
{
    unsigned long acc = 0;
    for (unsigned long i = 0; i < 4; i++)
        acc += leaf(n + i) * (i + 3);
    return acc ^ n;
}

__attribute__((noinline)) unsigned long lib_work(leaf_fn leaf, unsigned long n)
{
    unsigned long r = lib_inner(leaf, n * 7);
    return r + (n >> 3);
}
