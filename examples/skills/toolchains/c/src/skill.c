/* com.example.hello-c: answers {"hello":INPUT}, its input (JSON text) wrapped in a JSON object.
 *
 * ABI wasi-command-v1: an ordinary program. The input is stdin, the output stdout, exit code 0 success;
 * what goes to stderr is kept for `clawhub logs`. Built by `clawhub build` with clang and wasi-libc
 * (--target=wasm32-wasi): see docs/skills/c.md. */
#include <stdio.h>

/* Static, not on the stack: a wasm32 program's stack is small (64 KiB by default). */
static char buffer[65536];

int main(void) {
    size_t n;
    if (fputs("{\"hello\":", stdout) == EOF) return 1;
    while ((n = fread(buffer, 1, sizeof buffer, stdin)) > 0) {
        if (fwrite(buffer, 1, n, stdout) != n) return 1;
    }
    if (ferror(stdin)) return 2;
    if (fputs("}", stdout) == EOF) return 1;
    return fflush(stdout) == 0 ? 0 : 1;
}
