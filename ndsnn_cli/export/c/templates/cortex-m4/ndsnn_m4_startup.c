/* Minimal Cortex-M4F start-up for the bare-metal verification firmware (`ndsnn export --target cortex-m4`):
 * vector table, reset (copy .data, zero .bss, enable the FPU), fault handlers that end
 * the run with an error, and ARM semihosting (bkpt 0xab) for host file I/O under a debugger or QEMU.
 * The model (ndsnn_model.c, ndsnn_kernels.c) does not depend on this file: with a vendor start-up it
 * links unchanged. */
#include <stdint.h>

#include "ndsnn_m4.h"

extern uint32_t _data_load, _data_start, _data_end, _bss_start, _bss_end, _stack_top;
int main(void);

#define CPACR (*(volatile uint32_t *)0xe000ed88u)

uint32_t ndsnn_m4_semihost(uint32_t op, const void *args)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = args;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void ndsnn_m4_exit(int failed)
{
    /* SYS_EXIT with ADP_Stopped_ApplicationExit (QEMU exits 0) or ADP_Stopped_RunTimeErrorUnknown (exit 1) */
    for (;;) {
        ndsnn_m4_semihost(0x18u, (const void *)(uintptr_t)(failed ? 0x20023u : 0x20026u));
    }
}

void ndsnn_m4_reset(void)
{
    const uint32_t *from = &_data_load;
    uint32_t *to = &_data_start;
    while (to < &_data_end) {
        *to++ = *from++;
    }
    for (to = &_bss_start; to < &_bss_end; ++to) {
        *to = 0u;
    }
    CPACR |= 0xfu << 20; /* CP10 and CP11: full access to the FPU, before any float instruction */
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    ndsnn_m4_exit(main() != 0);
}

static void fault(void)
{
    static const char message[] = "ndsnn firmware: fault\n";
    ndsnn_m4_semihost(0x04u, message); /* SYS_WRITE0 */
    ndsnn_m4_exit(1);
}

typedef void (*vector)(void);

/* initial stack pointer, reset, NMI, HardFault, MemManage, BusFault, UsageFault (7 more: unused) */
__attribute__((section(".vectors"), used)) static const vector vectors[16] = {
    (vector)(uintptr_t)&_stack_top, ndsnn_m4_reset, fault, fault, fault, fault, fault,
    0, 0, 0, 0, fault, fault, 0, fault, fault,
};
