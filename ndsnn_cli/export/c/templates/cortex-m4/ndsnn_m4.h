/* The bare-metal verification firmware's start-up services (ndsnn_m4_startup.c). */
#ifndef NDSNN_M4_H
#define NDSNN_M4_H

#include <stdint.h>

/* One ARM semihosting call (bkpt 0xab): operation number and its argument block; returns r0. */
uint32_t ndsnn_m4_semihost(uint32_t op, const void *args);

/* End the run (QEMU exits 0 or 1). */
void ndsnn_m4_exit(int failed);

#endif /* NDSNN_M4_H */
