// hm_score_mem: the scores of SLOTS queries x NMAX rows, in W single-score RAMs ("lanes") read
// together, so a selection scan reads W scores of one slot per cycle. All slots share the
// lanes: row i of slot s sits in lane (i + s * ST) mod W at address s * NMAX / W + i / W,
// with G = 2^ceil(log2 SLOTS) groups of ST = W / G lanes. A stream row (one score per slot,
// the same row index) then writes SLOTS different lanes, each RAM takes one write per cycle,
// and every RAM is NMAX * G / W deep (8192 at the defaults: two URAM288 each, none wasted by
// shallow, wide words).
//
// Lane L is lane l = L mod ST of group g = L / ST. Row i of slot s is in lane l = i mod ST
// of group (i / ST + s) mod G: every slot of a stream row uses the same l, and the slots
// rotate over the groups. So the stream's selects are narrow: one ST-way select per group
// (by l), then one G-way select per slot (by group); a write's data is a G-way select per
// group, shared by the group's lanes.
//
// Stream side, a two-stage read-modify-write: cycle 0 reads the stored scores of the row,
// cycle 1 writes op(stored, new) (0 write, 1 add, 2 max) and presents it on up_* for the
// histograms. The RAMs are write-through, so back-to-back updates of one word see each other.
// Read side: `rword` is word `raddr` of slot `rslot`, one cycle after them, scores in row
// order (the slot's group rotation undone). Reads and stream writes share the RAMs' read
// port; the stream (in_valid) has it.
`default_nettype none

module hm_score_mem #(
    parameter SLOTS = 1,
    parameter NMAX  = 1024,  // rows per slot; a power of two, at least 2 * W
    parameter W     = 64,    // lanes (scores per read word), a power of two >= 2^ceil(log2 SLOTS)
    parameter XW    = 10     // $clog2(NMAX)
) (
    input wire clk,

    input wire                  in_valid,
    input wire [        XW-1:0] in_idx,
    input wire [     SLOTS-1:0] in_mask,
    input wire [  SLOTS*64-1:0] in_scores,
    input wire [           1:0] in_op,
    input wire                  in_final,

    output wire                up_valid,  // a row stored this cycle (stage 1)
    output wire [SLOTS-1:0]    up_mask,
    output wire [SLOTS*64-1:0] up_vals,
    output wire                up_final,

    input  wire [((SLOTS > 1) ? $clog2(SLOTS) : 1)-1:0] rslot,
    input  wire [                       XW-$clog2(W)-1:0] raddr,
    output wire [                               W*64-1:0] rword
);
    localparam LW = $clog2(W);
    localparam WA = XW - LW;  // address bits of a slot's words
    localparam SB = $clog2(SLOTS);  // 0 for one slot
    localparam SW = (SLOTS > 1) ? SB : 1;
    localparam G = 1 << SB;  // lane groups
    localparam ST = W >> SB;  // lanes per group
    localparam LB = LW - SB;  // bits of a lane within its group
    localparam LBW = (LB > 0) ? LB : 1;
    localparam NW = NMAX / W;  // words per slot
    localparam AW = WA + SB;
    localparam DEPTH = NW << SB;

    // stage 1 registers
    reg            v1;
    reg [  XW-1:0] idx1;
    reg [SLOTS-1:0] mask1;
    reg [SLOTS*64-1:0] sc1;
    reg [       1:0] op1;
    reg             fin1;
    reg [    SW-1:0] rs1;
    always @(posedge clk) begin
        v1    <= in_valid;
        idx1  <= in_idx;
        mask1 <= in_mask;
        sc1   <= in_scores;
        op1   <= in_op;
        fin1  <= in_final;
        rs1   <= rslot;
    end

    // a row's lane within its group and its group offset, at the read (0) and write (1) stage
    wire [LW-1:0] lo1 = idx1[LW-1:0] & (ST - 1);
    wire [LW-1:0] hi0 = (in_idx[LW-1:0] >> LB) & (G - 1);
    wire [LW-1:0] hi1 = (idx1[LW-1:0] >> LB) & (G - 1);

    wire [W*64-1:0] dout;
    wire [G*64-1:0] colv;  // per group: the lane of the stage-1 row
    wire [G*64-1:0] upg;  // up_vals, padded to G slots
    wire [G-1:0] maskg = mask1;
    assign upg = up_vals;

    genvar g, s, L;
    generate
        for (g = 0; g < G; g = g + 1) begin : g_col
            hm_mux #(
                .N(ST),
                .WIDTH(64)
            ) u_col (
                .in (dout[64*ST*g+:64*ST]),
                .sel(lo1[LBW-1:0]),
                .out(colv[64*g+:64])
            );
        end

        // stage 1: each slot's stored score (from its group's column) merged with the new one
        for (s = 0; s < SLOTS; s = s + 1) begin : g_slot
            wire [LW-1:0] grp = (hi1 + s) & (G - 1);
            wire [63:0] old;
            hm_mux #(
                .N(G),
                .WIDTH(64)
            ) u_old (
                .in (colv),
                .sel(grp[SW-1:0]),
                .out(old)
            );
            wire [63:0] nw = sc1[64*s+:64];
            assign up_vals[64*s+:64] = (op1 == 2'd1) ? old + nw :
                ((op1 == 2'd2) && $signed(old) >= $signed(nw)) ? old : nw;
        end

        // per group: the slot whose row lands in it (stage 0 for the read address, stage 1
        // for the write), that slot's new score, and the read side's rotation undone
        for (g = 0; g < G; g = g + 1) begin : g_grp
            wire [LW-1:0] sl0 = (g - hi0) & (G - 1);
            wire [LW-1:0] sl1 = (g - hi1) & (G - 1);
            wire [LW-1:0] rgrp = (g + rs1) & (G - 1);
            wire [AW-1:0] ra = in_valid ? ((sl0 << WA) | in_idx[XW-1:LW]) : ((rslot << WA) | raddr);
            wire [AW-1:0] wa = (sl1 << WA) | idx1[XW-1:LW];
            wire wslot = v1 && maskg[sl1[SW-1:0]];
            wire [63:0] wd;
            hm_mux #(
                .N(G),
                .WIDTH(64)
            ) u_wd (
                .in (upg),
                .sel(sl1[SW-1:0]),
                .out(wd)
            );
            hm_mux #(
                .N(G),
                .WIDTH(64 * ST)
            ) u_rd (
                .in (dout),
                .sel(rgrp[SW-1:0]),
                .out(rword[64*ST*g+:64*ST])
            );
            for (L = 0; L < ST; L = L + 1) begin : g_lane
                hm_ram #(
                    .DEPTH(DEPTH),
                    .WIDTH(64),
                    .AW(AW),
                    .ULTRA(1)
                ) u_ram (
                    .clk(clk),
                    .we(wslot && lo1 == L),
                    .waddr(wa),
                    .wdata(wd),
                    .raddr(ra),
                    .rdata(dout[64*(ST*g+L)+:64])
                );
            end
        end
    endgenerate

    assign up_valid = v1;
    assign up_mask  = mask1;
    assign up_final = fin1;
endmodule

`default_nettype wire
