
# Bare-metal Cortex-M4 firmware for the emulated board (QEMU mps2-an386), as `ndsnn export --target
# cortex-m4` verified it: make firmware.elf && make qemu IMAGES=images.f32 (writes results.bin).
ARM_CC ?= arm-none-eabi-gcc
ARM_FLAGS ?= @ARM_FLAGS@
IMAGES ?= images.f32

firmware.elf: ndsnn_m4_startup.c ndsnn_m4_main.c ndsnn_model.c ndsnn_kernels.c ndsnn_m4.h ndsnn_model.h ndsnn_kernels.h ndsnn_m4.ld
	$(ARM_CC) $(CFLAGS) $(ARM_FLAGS) @LINK_FLAGS@ -o $@ ndsnn_m4_startup.c ndsnn_m4_main.c ndsnn_model.c ndsnn_kernels.c

qemu: firmware.elf
	@QEMU@,arg=firmware,arg=$(IMAGES),arg=results.bin -kernel firmware.elf

.PHONY: qemu
