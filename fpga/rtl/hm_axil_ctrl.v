// hm_axil_ctrl: the AXI4-Lite control slave, Vitis `ap_ctrl_hs`: 0x00 control (bit 0 ap_start,
// bit 1 ap_done and bit 3 ap_ready, both cleared when read, bit 2 ap_idle), 0x04 global
// interrupt enable, 0x08 IP interrupt enable, 0x0C IP interrupt status (toggle on write), then
// the arguments at the offsets of the kernel's spec (hm_regmap.vh, generated from
// hetmem.kernels): 64-bit buffer addresses as two words, 32-bit scalars as one.
// `kernel` selects whose map decodes the addresses (a constant in each kernel's wrapper).
`default_nettype none

module hm_axil_ctrl #(
    parameter ADDR_W = 12
) (
    input wire       clk,
    input wire       rst,
    input wire [1:0] kernel,

    input  wire [ADDR_W-1:0] s_awaddr,
    input  wire              s_awvalid,
    output wire              s_awready,
    input  wire [      31:0] s_wdata,
    input  wire [       3:0] s_wstrb,
    input  wire              s_wvalid,
    output wire              s_wready,
    output wire [       1:0] s_bresp,
    output reg               s_bvalid,
    input  wire              s_bready,
    input  wire [ADDR_W-1:0] s_araddr,
    input  wire              s_arvalid,
    output wire              s_arready,
    output reg  [      31:0] s_rdata,
    output wire [       1:0] s_rresp,
    output reg               s_rvalid,
    input  wire              s_rready,
    output wire              interrupt,

    input  wire          engine_idle,
    output wire          start,        // pulse: the engine takes the arguments and runs
    input  wire          done,         // pulse from the engine
    output wire [8*64-1:0] buffers,    // A, B, Q, W, D, OUT, SEGS, STAGE addresses
    output wire [7*32-1:0] scalars     // N, K, QUERIES, HEADS, DIM, MODE, STAGED
);
`include "hm_regmap.vh"

    reg [63:0] buf_reg[0:7];
    reg [31:0] scal_reg[0:6];
    reg ap_start, ap_done, ap_ready, gie;
    reg [1:0] ier, isr;

    genvar f;
    generate
        for (f = 0; f < 8; f = f + 1) begin : g_buf
            assign buffers[64*f+:64] = buf_reg[f];
        end
        for (f = 0; f < 7; f = f + 1) begin : g_scal
            assign scalars[32*f+:32] = scal_reg[f];
        end
    endgenerate

    assign start = ap_start && engine_idle;
    assign interrupt = gie && (isr != 2'b00);
    assign s_bresp = 2'b00;
    assign s_rresp = 2'b00;

    // -- write channel: address and data may come in either order ------------------------------
    reg aw_held, w_held;
    reg [ADDR_W-1:0] aw_addr;
    reg [31:0] w_data;
    reg [3:0] w_strb;
    assign s_awready = !aw_held;
    assign s_wready = !w_held;
    wire do_write = aw_held && w_held && !s_bvalid;
    wire [5:0] wdec = hm_reg_decode(kernel, aw_addr);
    wire [31:0] bytemask = {{8{w_strb[3]}}, {8{w_strb[2]}}, {8{w_strb[1]}}, {8{w_strb[0]}}};

    // -- read channel ------------------------------------------------------------------------
    assign s_arready = !s_rvalid;
    wire do_read = s_arvalid && s_arready;
    // registers are 32-bit words: the low two address bits of an access are its byte lanes
    // (AXI4-Lite allows an unaligned address; the strobes say which bytes are written)
    wire [ADDR_W-1:0] raddr = {s_araddr[ADDR_W-1:2], 2'b00};
    wire [5:0] rdec = hm_reg_decode(kernel, raddr);
    reg [31:0] rvalue;
    always @(*) begin
        rvalue = 32'd0;
        if (raddr == HM_CTRL)
            rvalue = {28'd0, ap_ready, engine_idle && !ap_start, ap_done, ap_start};
        else if (raddr == HM_GIE) rvalue = {31'd0, gie};
        else if (raddr == HM_IER) rvalue = {30'd0, ier};
        else if (raddr == HM_ISR) rvalue = {30'd0, isr};
        else if (rdec[5]) begin
            if (rdec[3:0] < 4'd8) rvalue = rdec[4] ? buf_reg[rdec[2:0]][63:32] : buf_reg[rdec[2:0]][31:0];
            else rvalue = scal_reg[rdec[3:0] - 4'd8];
        end
    end

    integer i;
    always @(posedge clk) begin
        if (rst) begin
            aw_held  <= 1'b0;
            w_held   <= 1'b0;
            s_bvalid <= 1'b0;
            s_rvalid <= 1'b0;
            ap_start <= 1'b0;
            ap_done  <= 1'b0;
            ap_ready <= 1'b0;
            gie      <= 1'b0;
            ier      <= 2'b00;
            isr      <= 2'b00;
            for (i = 0; i < 8; i = i + 1) buf_reg[i] <= 64'd0;
            for (i = 0; i < 7; i = i + 1) scal_reg[i] <= 32'd0;
        end else begin
            if (s_awvalid && s_awready) begin
                aw_held <= 1'b1;
                aw_addr <= {s_awaddr[ADDR_W-1:2], 2'b00};
            end
            if (s_wvalid && s_wready) begin
                w_held <= 1'b1;
                w_data <= s_wdata;
                w_strb <= s_wstrb;
            end
            if (s_bvalid && s_bready) s_bvalid <= 1'b0;
            if (s_rvalid && s_rready) s_rvalid <= 1'b0;

            if (do_write) begin
                aw_held  <= 1'b0;
                w_held   <= 1'b0;
                s_bvalid <= 1'b1;
                if (aw_addr == HM_CTRL) begin
                    if (w_strb[0] && w_data[0]) ap_start <= 1'b1;
                end else if (aw_addr == HM_GIE) begin
                    if (w_strb[0]) gie <= w_data[0];
                end else if (aw_addr == HM_IER) begin
                    if (w_strb[0]) ier <= w_data[1:0];
                end else if (aw_addr == HM_ISR) begin
                    if (w_strb[0]) isr <= isr ^ w_data[1:0];
                end else if (wdec[5]) begin
                    if (wdec[3:0] < 4'd8) begin
                        if (wdec[4])
                            buf_reg[wdec[2:0]][63:32] <= (buf_reg[wdec[2:0]][63:32] & ~bytemask) | (w_data & bytemask);
                        else
                            buf_reg[wdec[2:0]][31:0] <= (buf_reg[wdec[2:0]][31:0] & ~bytemask) | (w_data & bytemask);
                    end else begin
                        scal_reg[wdec[3:0] - 4'd8] <= (scal_reg[wdec[3:0] - 4'd8] & ~bytemask) | (w_data & bytemask);
                    end
                end
            end

            if (do_read) begin
                s_rdata  <= rvalue;
                s_rvalid <= 1'b1;
                if (raddr == HM_CTRL) begin
                    ap_done  <= 1'b0;
                    ap_ready <= 1'b0;
                end
            end

            if (start) ap_start <= 1'b0;
            if (done) begin
                ap_done  <= 1'b1;
                ap_ready <= 1'b1;
                if (ier[0]) isr[0] <= 1'b1;
                if (ier[1]) isr[1] <= 1'b1;
            end
        end
    end
endmodule

`default_nettype wire
