// hm_cosim_tb: a plain-Verilog bench of one kernel top (HM_TOP, e.g. -DHM_TOP=hm_vector_search)
// for Icarus, with the same memory model and control sequence as the Verilator harness
// (harness.cpp): one AXI4 slave per master port over a memory image, a burst's first beat
// LATENCY cycles after its address then one beat per cycle, write responses LATENCY cycles
// after the last beat; AXI4-Lite writes of GIE, IER, the argument registers and ap_start;
// cycles counted from the edge that accepts the ap_start write to the edge that raises
// ap_done. bench/rtl_sim.py uses it to measure Icarus's speed on the same calls.
//
// Files in the working directory: a.hex, b.hex, q.hex (512-bit beats, one per line, the
// images of ports m_axi_mem_a, m_axi_mem_b and m_axi_query from address 0), regs.hex (pairs
// of 32-bit words: register offset, value; +nregs= of them); +max_cycles= bounds the wait. Writes out.hex
// (the first OUT_BEATS beats of m_axi_out) and prints "HM_CYCLES <n>" (or "HM_TIMEOUT <n>")
// and "HM_TOTAL <edges simulated>".
`timescale 1ns / 1ps
`default_nettype none

module hm_tb_axi_rd #(
    parameter DEPTH = 4096,  // beats
    parameter LATENCY = 32,
    parameter QD = 64  // bursts queued
) (
    input wire clk,
    input wire rst,
    input wire [63:0] now,
    input wire [63:0] araddr,
    input wire [7:0] arlen,
    input wire arvalid,
    output wire arready,
    output wire [511:0] rdata,
    output wire [1:0] rresp,
    output wire rlast,
    output wire rvalid,
    input wire rready
);
    reg [511:0] mem[0:DEPTH-1];
    reg [63:0] qa[0:QD-1];
    reg [8:0] ql[0:QD-1];
    reg [63:0] qt[0:QD-1];
    reg [6:0] head, tail, count;
    reg [8:0] beat;
    wire [63:0] index = (qa[head] >> 6) + beat;
    assign arready = count < QD;
    assign rvalid = count != 0 && qt[head] <= now;
    assign rdata = index < DEPTH ? mem[index] : 512'd0;
    assign rresp = index < DEPTH ? 2'd0 : 2'd3;
    assign rlast = beat == ql[head];
    wire push = arvalid && arready;
    wire pop = rvalid && rready && rlast;
    always @(posedge clk) begin
        if (rst) begin
            head <= 0;
            tail <= 0;
            count <= 0;
            beat <= 0;
        end else begin
            if (push) begin
                qa[tail] <= araddr;
                ql[tail] <= {1'b0, arlen};
                qt[tail] <= now + 1 + LATENCY;
                tail <= (tail + 1) % QD;
            end
            if (rvalid && rready) beat <= rlast ? 9'd0 : beat + 1'b1;
            if (pop) head <= (head + 1) % QD;
            count <= count + push - pop;
        end
    end
endmodule

module hm_tb_axi_wr #(
    parameter DEPTH = 4096,
    parameter LATENCY = 32,
    parameter QD = 64
) (
    input wire clk,
    input wire rst,
    input wire [63:0] now,
    input wire [63:0] awaddr,
    input wire [7:0] awlen,
    input wire awvalid,
    output wire awready,
    input wire [511:0] wdata,
    input wire [63:0] wstrb,
    input wire wlast,
    input wire wvalid,
    output wire wready,
    output wire [1:0] bresp,
    output wire bvalid,
    input wire bready
);
    reg [511:0] mem[0:DEPTH-1];
    reg [63:0] qa[0:QD-1];
    reg [8:0] ql[0:QD-1];
    reg [63:0] bt[0:QD-1];
    reg [6:0] head, tail, count, bhead, btail, bcount;
    reg [8:0] beat;
    wire [63:0] index = (qa[head] >> 6) + beat;
    assign awready = count < QD;
    assign wready = count != 0;
    assign bvalid = bcount != 0 && bt[bhead] <= now;
    assign bresp = 2'd0;
    wire push = awvalid && awready;
    wire take = wvalid && wready;
    wire done = take && (beat == ql[head] || wlast);
    wire bpop = bvalid && bready;
    integer i;
    always @(posedge clk) begin
        if (rst) begin
            head <= 0;
            tail <= 0;
            count <= 0;
            bhead <= 0;
            btail <= 0;
            bcount <= 0;
            beat <= 0;
        end else begin
            if (push) begin
                qa[tail] <= awaddr;
                ql[tail] <= {1'b0, awlen};
                tail <= (tail + 1) % QD;
            end
            if (take && index < DEPTH)
                for (i = 0; i < 64; i = i + 1)
                    if (wstrb[i]) mem[index][8*i+:8] <= wdata[8*i+:8];
            if (take) beat <= done ? 9'd0 : beat + 1'b1;
            if (done) begin
                head <= (head + 1) % QD;
                bt[btail] <= now + 1 + LATENCY;
                btail <= (btail + 1) % QD;
            end
            count <= count + push - done;
            bcount <= bcount + done - bpop;
        end
    end
endmodule

module hm_cosim_tb;
    parameter A_BEATS = 65536;
    parameter B_BEATS = 65536;
    parameter Q_BEATS = 4096;
    parameter OUT_BEATS = 4096;
    parameter LATENCY = 32;
    parameter MAX_CYCLES = 100000000;

    reg clk = 1'b0;
    always #5 clk = ~clk;
    reg rst_n = 1'b0;
    reg [63:0] now = 0;
    always @(posedge clk) now <= now + 1;

    reg [11:0] awaddr = 0, araddr = 0;
    reg [31:0] wdata = 0;
    reg awvalid = 1'b0, wvalid = 1'b0, arvalid = 1'b0;
    wire awready, wready, bvalid, arready, rvalid, irq;
    wire [1:0] bresp, rresp;
    wire [31:0] rdata;

    wire [63:0] ma_araddr;
    wire [7:0] ma_arlen;
    wire [2:0] ma_arsize;
    wire [1:0] ma_arburst;
    wire [0:0] ma_arid;
    wire ma_arvalid, ma_arready, ma_rlast, ma_rvalid, ma_rready;
    wire [511:0] ma_rdata;
    wire [1:0] ma_rresp;
    wire [63:0] mb_araddr;
    wire [7:0] mb_arlen;
    wire [2:0] mb_arsize;
    wire [1:0] mb_arburst;
    wire [0:0] mb_arid;
    wire mb_arvalid, mb_arready, mb_rlast, mb_rvalid, mb_rready;
    wire [511:0] mb_rdata;
    wire [1:0] mb_rresp;
    wire [63:0] mq_araddr;
    wire [7:0] mq_arlen;
    wire [2:0] mq_arsize;
    wire [1:0] mq_arburst;
    wire [0:0] mq_arid;
    wire mq_arvalid, mq_arready, mq_rlast, mq_rvalid, mq_rready;
    wire [511:0] mq_rdata;
    wire [1:0] mq_rresp;
    wire [63:0] o_awaddr;
    wire [7:0] o_awlen;
    wire [2:0] o_awsize;
    wire [1:0] o_awburst;
    wire [0:0] o_awid;
    wire o_awvalid, o_awready, o_wlast, o_wvalid, o_wready, o_bvalid, o_bready;
    wire [511:0] o_wdata;
    wire [63:0] o_wstrb;
    wire [1:0] o_bresp;

    `HM_TOP dut (
        .ap_clk(clk),
        .ap_rst_n(rst_n),
        .s_axi_control_awaddr(awaddr),
        .s_axi_control_awvalid(awvalid),
        .s_axi_control_awready(awready),
        .s_axi_control_wdata(wdata),
        .s_axi_control_wstrb(4'hf),
        .s_axi_control_wvalid(wvalid),
        .s_axi_control_wready(wready),
        .s_axi_control_bresp(bresp),
        .s_axi_control_bvalid(bvalid),
        .s_axi_control_bready(1'b1),
        .s_axi_control_araddr(araddr),
        .s_axi_control_arvalid(arvalid),
        .s_axi_control_arready(arready),
        .s_axi_control_rdata(rdata),
        .s_axi_control_rresp(rresp),
        .s_axi_control_rvalid(rvalid),
        .s_axi_control_rready(1'b1),
        .interrupt(irq),
        .m_axi_mem_a_araddr(ma_araddr), .m_axi_mem_a_arlen(ma_arlen),
        .m_axi_mem_a_arsize(ma_arsize), .m_axi_mem_a_arburst(ma_arburst),
        .m_axi_mem_a_arid(ma_arid), .m_axi_mem_a_arvalid(ma_arvalid),
        .m_axi_mem_a_arready(ma_arready), .m_axi_mem_a_rdata(ma_rdata),
        .m_axi_mem_a_rresp(ma_rresp), .m_axi_mem_a_rlast(ma_rlast), .m_axi_mem_a_rid(1'b0),
        .m_axi_mem_a_rvalid(ma_rvalid), .m_axi_mem_a_rready(ma_rready),
        // no staged beats on this bench: the memory port's write channels are idle
        .m_axi_mem_a_awready(1'b0), .m_axi_mem_a_wready(1'b0),
        .m_axi_mem_a_bresp(2'b00), .m_axi_mem_a_bid(1'b0), .m_axi_mem_a_bvalid(1'b0),
        .m_axi_mem_b_araddr(mb_araddr), .m_axi_mem_b_arlen(mb_arlen),
        .m_axi_mem_b_arsize(mb_arsize), .m_axi_mem_b_arburst(mb_arburst),
        .m_axi_mem_b_arid(mb_arid), .m_axi_mem_b_arvalid(mb_arvalid),
        .m_axi_mem_b_arready(mb_arready), .m_axi_mem_b_rdata(mb_rdata),
        .m_axi_mem_b_rresp(mb_rresp), .m_axi_mem_b_rlast(mb_rlast), .m_axi_mem_b_rid(1'b0),
        .m_axi_mem_b_rvalid(mb_rvalid), .m_axi_mem_b_rready(mb_rready),
        // no staged beats on this bench: the memory port's write channels are idle
        .m_axi_mem_b_awready(1'b0), .m_axi_mem_b_wready(1'b0),
        .m_axi_mem_b_bresp(2'b00), .m_axi_mem_b_bid(1'b0), .m_axi_mem_b_bvalid(1'b0),
        .m_axi_query_araddr(mq_araddr), .m_axi_query_arlen(mq_arlen),
        .m_axi_query_arsize(mq_arsize), .m_axi_query_arburst(mq_arburst),
        .m_axi_query_arid(mq_arid), .m_axi_query_arvalid(mq_arvalid),
        .m_axi_query_arready(mq_arready), .m_axi_query_rdata(mq_rdata),
        .m_axi_query_rresp(mq_rresp), .m_axi_query_rlast(mq_rlast), .m_axi_query_rid(1'b0),
        .m_axi_query_rvalid(mq_rvalid), .m_axi_query_rready(mq_rready),
        .m_axi_out_awaddr(o_awaddr), .m_axi_out_awlen(o_awlen), .m_axi_out_awsize(o_awsize),
        .m_axi_out_awburst(o_awburst), .m_axi_out_awid(o_awid),
        .m_axi_out_awvalid(o_awvalid), .m_axi_out_awready(o_awready),
        .m_axi_out_wdata(o_wdata), .m_axi_out_wstrb(o_wstrb), .m_axi_out_wlast(o_wlast),
        .m_axi_out_wvalid(o_wvalid), .m_axi_out_wready(o_wready),
        .m_axi_out_bresp(o_bresp), .m_axi_out_bid(1'b0), .m_axi_out_bvalid(o_bvalid),
        .m_axi_out_bready(o_bready)
    );

    hm_tb_axi_rd #(
        .DEPTH(A_BEATS),
        .LATENCY(LATENCY)
    ) u_a (
        .clk(clk), .rst(!rst_n), .now(now), .araddr(ma_araddr), .arlen(ma_arlen),
        .arvalid(ma_arvalid), .arready(ma_arready), .rdata(ma_rdata), .rresp(ma_rresp),
        .rlast(ma_rlast), .rvalid(ma_rvalid), .rready(ma_rready)
    );
    hm_tb_axi_rd #(
        .DEPTH(B_BEATS),
        .LATENCY(LATENCY)
    ) u_b (
        .clk(clk), .rst(!rst_n), .now(now), .araddr(mb_araddr), .arlen(mb_arlen),
        .arvalid(mb_arvalid), .arready(mb_arready), .rdata(mb_rdata), .rresp(mb_rresp),
        .rlast(mb_rlast), .rvalid(mb_rvalid), .rready(mb_rready)
    );
    hm_tb_axi_rd #(
        .DEPTH(Q_BEATS),
        .LATENCY(LATENCY)
    ) u_q (
        .clk(clk), .rst(!rst_n), .now(now), .araddr(mq_araddr), .arlen(mq_arlen),
        .arvalid(mq_arvalid), .arready(mq_arready), .rdata(mq_rdata), .rresp(mq_rresp),
        .rlast(mq_rlast), .rvalid(mq_rvalid), .rready(mq_rready)
    );
    hm_tb_axi_wr #(
        .DEPTH(OUT_BEATS),
        .LATENCY(LATENCY)
    ) u_out (
        .clk(clk), .rst(!rst_n), .now(now), .awaddr(o_awaddr), .awlen(o_awlen),
        .awvalid(o_awvalid), .awready(o_awready), .wdata(o_wdata), .wstrb(o_wstrb),
        .wlast(o_wlast), .wvalid(o_wvalid), .wready(o_wready), .bresp(o_bresp),
        .bvalid(o_bvalid), .bready(o_bready)
    );

    reg aw_ok, w_ok, ar_ok;
    reg [63:0] accepted;

    // One AXI4-Lite write; `accepted` = edges so far once its address and data are in.
    task lite_write(input [11:0] addr, input [31:0] data);
        begin
            awaddr <= addr;
            wdata <= data;
            awvalid <= 1'b1;
            wvalid <= 1'b1;
            aw_ok = 1'b0;
            w_ok = 1'b0;
            while (!(aw_ok && w_ok)) begin
                @(posedge clk);
                if (awvalid && awready) aw_ok = 1'b1;
                if (wvalid && wready) w_ok = 1'b1;
                if (aw_ok) awvalid <= 1'b0;
                if (w_ok) wvalid <= 1'b0;
            end
            accepted = now + 1;
            @(posedge clk);
            while (!bvalid) @(posedge clk);
        end
    endtask

    task lite_read(input [11:0] addr, output [31:0] data);
        begin
            araddr <= addr;
            arvalid <= 1'b1;
            ar_ok = 1'b0;
            while (!ar_ok) begin
                @(posedge clk);
                if (arvalid && arready) ar_ok = 1'b1;
                if (ar_ok) arvalid <= 1'b0;
            end
            @(posedge clk);
            while (!rvalid) @(posedge clk);
            data = rdata;
        end
    endtask

    reg [31:0] regs[0:255];
    integer nregs, r;
    reg [63:0] start, cycles;
    reg [31:0] ctrl;
    reg [63:0] max_cycles;
    initial begin
        if (!$value$plusargs("nregs=%d", nregs)) nregs = 0;
        if (!$value$plusargs("max_cycles=%d", max_cycles)) max_cycles = MAX_CYCLES;
        $readmemh("a.hex", u_a.mem);
        $readmemh("b.hex", u_b.mem);
        $readmemh("q.hex", u_q.mem);
        $readmemh("regs.hex", regs);
        repeat (8) @(posedge clk);
        rst_n <= 1'b1;
        repeat (2) @(posedge clk);
        lite_write(12'h004, 32'd1);  // GIE
        lite_write(12'h008, 32'd1);  // IER
        for (r = 0; r < nregs; r = r + 1) lite_write(regs[2*r][11:0], regs[2*r+1]);
        lite_write(12'h000, 32'd1);  // ap_start
        start = accepted;
        #1;
        while (!irq && now - start < max_cycles) begin
            @(posedge clk);
            #1;
        end
        cycles = now - start;
        if (!irq) begin
            $display("HM_TIMEOUT %0d", cycles);
            $display("HM_TOTAL %0d", now);
            $finish;
        end
        lite_read(12'h000, ctrl);
        if (!(ctrl & 32'h2)) $display("HM_ERROR ap_done not set in CTRL (%h)", ctrl);
        $writememh("out.hex", u_out.mem);
        $display("HM_CYCLES %0d", cycles);
        $display("HM_TOTAL %0d", now);
        $finish;
    end
endmodule

`default_nettype wire
