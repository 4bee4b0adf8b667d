/* Symbolization target for tests/unit/test_symbols.py: prints the addresses of a function of
 * its own, of a size-0 assembly function and of libc's getppid, then waits to be killed. */
#include <stdio.h>
#include <unistd.h>

/* A function symbol without .size, as hand-written assembly often has. */
__asm__(".text\n"
        ".globl sym_asm_nosize\n"
        ".type sym_asm_nosize, @function\n"
        "sym_asm_nosize:\n"
        "  nop\n  nop\n  nop\n  ret\n");
void sym_asm_nosize(void);

__attribute__((noinline)) int sym_target_leaf(int x) {
    return x * 3 + (int)getppid();
}

int main(void) {
    printf("%p %p %p %p\n", (void *)sym_target_leaf, (void *)sym_asm_nosize,
           (void *)&getppid, (void *)main);
    fflush(stdout);
    for (;;)
        pause();
}
