// hm_engine: the fused Compute Relevancy + Retrieval engine of the kernel specs
// (hetmem.kernels): token_indexer (DSA), page_indexer (Quest), vector_search (dense RAG) and
// block_gate (SeerAttention-R), selected by `kernel` (tied in each kernel's wrapper).
//
// Segments: query i scans memory rows [base_i, base_i + rows_i) (`segs`, uint32 (base, rows)
// per query; its selection's indices are relative to base_i), so one call covers every slot
// of a layer that lives in one memory buffer. segs travels on the query port: it is read
// where the port is idle anyway (before a pass's query load; never while the memory
// streams), it is a few bytes per query, and its HBM pseudo-channel sits beside the other
// query buffers' (one contiguous range for the port). The call first reads every segment
// once and refuses the call, nothing written, when one is invalid (rows 0 or > n, or k > rows
// in top-k mode); then each pass reads the segments of its candidate queries again and takes
// the CONSECUTIVE queries that share the first one's segment (at most as many as today's
// lanes/slots rule allows).
//
// A call runs in passes. A pass loads up to LANES query vectors (query x head, whole queries
// when heads <= LANES, else one query's heads LANES at a time) into the lanes, then streams its
// segment of the memory once from HBM: port A (keys, or page minima) and port B (row shifts, or
// page maxima) read one 512-bit beat per cycle each from the segment's base row,
// hm_row_aligner cuts rows into 64-byte chunks,
// every lane takes every chunk against its own query vector, and the scores are assembled per
// query slot:
//   token_indexer  sum over the slot's heads of w_h * ReLU(q_h . k), << shift
//   page_indexer   max over the slot's heads of sum_i q_i * (q_i < 0 ? min_i : max_i)
//   vector_search  q . k << shift
//   block_gate     q . k << shift (top-k, or threshold bitmap s >= max - delta)
// hm_topk keeps each slot's scores and, after the pass, selects per query (in query order)
// over the segment's rows; a bitmap row stays ceil(n / 32) words, its bits past rows zero.
// hm_axi_writer writes the selection contiguously to `out`.
// Invalid scalars (n = 0 or > NMAX, dim = 0 or > DMAX, no queries or heads, k = 0 or > n in
// top-k mode, mode > 1) end the call at once without writing anything; so do invalid
// segments, after the segment check.
`default_nettype none

module hm_engine #(
    parameter LANES = 8,      // dot-product lanes (query vectors per pass)
    parameter SLOTS = 8,      // queries whose scores are kept at once (<= LANES)
    parameter NMAX  = 65536,  // rows per call; a power of two
    parameter DMAX  = 512,    // channels per row; a multiple of 64
    parameter SCAN  = 64      // scores per cycle of the selection scans
) (
    input wire       ap_clk,
    input wire       ap_rst_n,
    input wire [1:0] kernel,

    input  wire [11:0] s_axi_control_awaddr,
    input  wire        s_axi_control_awvalid,
    output wire        s_axi_control_awready,
    input  wire [31:0] s_axi_control_wdata,
    input  wire [ 3:0] s_axi_control_wstrb,
    input  wire        s_axi_control_wvalid,
    output wire        s_axi_control_wready,
    output wire [ 1:0] s_axi_control_bresp,
    output wire        s_axi_control_bvalid,
    input  wire        s_axi_control_bready,
    input  wire [11:0] s_axi_control_araddr,
    input  wire        s_axi_control_arvalid,
    output wire        s_axi_control_arready,
    output wire [31:0] s_axi_control_rdata,
    output wire [ 1:0] s_axi_control_rresp,
    output wire        s_axi_control_rvalid,
    input  wire        s_axi_control_rready,
    output wire        interrupt,

    output wire [ 63:0] m_axi_mem_a_araddr,
    output wire [  7:0] m_axi_mem_a_arlen,
    output wire [  2:0] m_axi_mem_a_arsize,
    output wire [  1:0] m_axi_mem_a_arburst,
    output wire [  0:0] m_axi_mem_a_arid,
    output wire         m_axi_mem_a_arvalid,
    input  wire         m_axi_mem_a_arready,
    input  wire [511:0] m_axi_mem_a_rdata,
    input  wire [  1:0] m_axi_mem_a_rresp,
    input  wire         m_axi_mem_a_rlast,
    input  wire [  0:0] m_axi_mem_a_rid,
    input  wire         m_axi_mem_a_rvalid,
    output wire         m_axi_mem_a_rready,
    output wire [ 63:0] m_axi_mem_a_awaddr,
    output wire [  7:0] m_axi_mem_a_awlen,
    output wire [  2:0] m_axi_mem_a_awsize,
    output wire [  1:0] m_axi_mem_a_awburst,
    output wire [  0:0] m_axi_mem_a_awid,
    output wire         m_axi_mem_a_awvalid,
    input  wire         m_axi_mem_a_awready,
    output wire [511:0] m_axi_mem_a_wdata,
    output wire [ 63:0] m_axi_mem_a_wstrb,
    output wire         m_axi_mem_a_wlast,
    output wire         m_axi_mem_a_wvalid,
    input  wire         m_axi_mem_a_wready,
    input  wire [  1:0] m_axi_mem_a_bresp,
    input  wire [  0:0] m_axi_mem_a_bid,
    input  wire         m_axi_mem_a_bvalid,
    output wire         m_axi_mem_a_bready,

    output wire [ 63:0] m_axi_mem_b_araddr,
    output wire [  7:0] m_axi_mem_b_arlen,
    output wire [  2:0] m_axi_mem_b_arsize,
    output wire [  1:0] m_axi_mem_b_arburst,
    output wire [  0:0] m_axi_mem_b_arid,
    output wire         m_axi_mem_b_arvalid,
    input  wire         m_axi_mem_b_arready,
    input  wire [511:0] m_axi_mem_b_rdata,
    input  wire [  1:0] m_axi_mem_b_rresp,
    input  wire         m_axi_mem_b_rlast,
    input  wire [  0:0] m_axi_mem_b_rid,
    input  wire         m_axi_mem_b_rvalid,
    output wire         m_axi_mem_b_rready,
    output wire [ 63:0] m_axi_mem_b_awaddr,
    output wire [  7:0] m_axi_mem_b_awlen,
    output wire [  2:0] m_axi_mem_b_awsize,
    output wire [  1:0] m_axi_mem_b_awburst,
    output wire [  0:0] m_axi_mem_b_awid,
    output wire         m_axi_mem_b_awvalid,
    input  wire         m_axi_mem_b_awready,
    output wire [511:0] m_axi_mem_b_wdata,
    output wire [ 63:0] m_axi_mem_b_wstrb,
    output wire         m_axi_mem_b_wlast,
    output wire         m_axi_mem_b_wvalid,
    input  wire         m_axi_mem_b_wready,
    input  wire [  1:0] m_axi_mem_b_bresp,
    input  wire [  0:0] m_axi_mem_b_bid,
    input  wire         m_axi_mem_b_bvalid,
    output wire         m_axi_mem_b_bready,

    output wire [ 63:0] m_axi_query_araddr,
    output wire [  7:0] m_axi_query_arlen,
    output wire [  2:0] m_axi_query_arsize,
    output wire [  1:0] m_axi_query_arburst,
    output wire [  0:0] m_axi_query_arid,
    output wire         m_axi_query_arvalid,
    input  wire         m_axi_query_arready,
    input  wire [511:0] m_axi_query_rdata,
    input  wire [  1:0] m_axi_query_rresp,
    input  wire         m_axi_query_rlast,
    input  wire [  0:0] m_axi_query_rid,
    input  wire         m_axi_query_rvalid,
    output wire         m_axi_query_rready,

    output wire [ 63:0] m_axi_out_awaddr,
    output wire [  7:0] m_axi_out_awlen,
    output wire [  2:0] m_axi_out_awsize,
    output wire [  1:0] m_axi_out_awburst,
    output wire [  0:0] m_axi_out_awid,
    output wire         m_axi_out_awvalid,
    input  wire         m_axi_out_awready,
    output wire [511:0] m_axi_out_wdata,
    output wire [ 63:0] m_axi_out_wstrb,
    output wire         m_axi_out_wlast,
    output wire         m_axi_out_wvalid,
    input  wire         m_axi_out_wready,
    input  wire [  1:0] m_axi_out_bresp,
    input  wire [  0:0] m_axi_out_bid,
    input  wire         m_axi_out_bvalid,
    output wire         m_axi_out_bready
);
    localparam XW = $clog2(NMAX);
    localparam SW = (SLOTS > 1) ? $clog2(SLOTS) : 1;
    localparam QCH = DMAX / 64;  // query chunks per lane
    localparam [1:0] OP_WRITE = 2'd0, OP_ADD = 2'd1, OP_MAX = 2'd2;
    localparam [63:0] MIN64 = 64'h8000_0000_0000_0000;
    localparam [31:0] STAGE_MAX = 32'h00FF_FFFF;  // staged beats: 68 bytes each fit 32 bits

    localparam [4:0] S_IDLE = 5'd0, S_SETUP = 5'd1, S_PASS = 5'd2, S_LQ_START = 5'd3,
                     S_LOADQ = 5'd4, S_LW_START = 5'd5, S_LOADW = 5'd6, S_LD_START = 5'd7,
                     S_LOADD = 5'd8, S_STREAM_START = 5'd9, S_STREAM = 5'd10, S_SELECT = 5'd11,
                     S_SELECT_WAIT = 5'd12, S_NEXT = 5'd13, S_FLUSH = 5'd14, S_DONE = 5'd15,
                     S_CHK_START = 5'd16, S_CHECK = 5'd17, S_SEG_START = 5'd18,
                     S_LOADSEG = 5'd19, S_STG_START = 5'd20, S_STAGE = 5'd21;

    wire rst = !ap_rst_n;
    reg [4:0] state;

    // -- control ---------------------------------------------------------------------------
    wire start;
    wire [8*64-1:0] buffers;
    wire [7*32-1:0] scalars;

    hm_axil_ctrl #(
        .ADDR_W(12)
    ) u_ctrl (
        .clk(ap_clk),
        .rst(rst),
        .kernel(kernel),
        .s_awaddr(s_axi_control_awaddr),
        .s_awvalid(s_axi_control_awvalid),
        .s_awready(s_axi_control_awready),
        .s_wdata(s_axi_control_wdata),
        .s_wstrb(s_axi_control_wstrb),
        .s_wvalid(s_axi_control_wvalid),
        .s_wready(s_axi_control_wready),
        .s_bresp(s_axi_control_bresp),
        .s_bvalid(s_axi_control_bvalid),
        .s_bready(s_axi_control_bready),
        .s_araddr(s_axi_control_araddr),
        .s_arvalid(s_axi_control_arvalid),
        .s_arready(s_axi_control_arready),
        .s_rdata(s_axi_control_rdata),
        .s_rresp(s_axi_control_rresp),
        .s_rvalid(s_axi_control_rvalid),
        .s_rready(s_axi_control_rready),
        .interrupt(interrupt),
        .engine_idle(state == S_IDLE),
        .start(start),
        .done(state == S_DONE),
        .buffers(buffers),
        .scalars(scalars)
    );

    // arguments, latched at start
    reg [1:0] kern;
    reg [63:0] a_addr, b_addr, q_addr, w_addr, d_addr, o_addr, s_addr;
    reg [31:0] n, k, nq, heads, dim, mode;
    reg [63:0] g_addr;  // the staged beats (`stage`)
    reg [31:0] staged;  // how many

    wire is_tok = kern == 2'd0;
    wire is_quest = kern == 2'd1;
    wire is_gate = kern == 2'd3;
    wire [31:0] nh = (is_tok || is_quest) ? heads : 32'd1;  // query vectors per query
    wire bitmap = is_gate && mode == 32'd1;
    wire split = nh > LANES;
    wire [31:0] per_pass_c = LANES / ((nh == 0) ? 32'd1 : nh);
    wire [31:0] rb_a = is_quest ? {dim[30:0], 1'b0} : dim;  // row bytes, port A
    wire [31:0] rb_b = is_quest ? {dim[30:0], 1'b0} : 32'd1;  // row bytes, port B
    wire bad = n == 0 || n > NMAX || dim == 0 || dim > DMAX || nq == 0 || nh == 0 ||
               (!bitmap && (k == 0 || k > n)) || (is_gate && mode > 32'd1) ||
               (staged != 0 && (staged > STAGE_MAX || a_addr[5:0] != 0 || b_addr[5:0] != 0));

    reg [31:0] per_pass;  // queries per pass (heads <= LANES)
    // segments: the pass's candidates (queries q0 .., as loaded), the pass's own
    reg [31:0] seg_base[0:SLOTS-1];
    reg [31:0] seg_rows[0:SLOTS-1];
    reg [31:0] seg_m;  // candidates loaded
    reg seg_bad;  // the segment check found an invalid segment
    reg [31:0] cur_base, cur_rows;  // the pass's segment
    reg [63:0] a_seg, b_seg;  // byte address of the segment's first row, ports A and B
    reg [31:0] q0;  // first query of the pass
    reg [31:0] hc;  // head chunk (heads > LANES)
    reg [31:0] pq;  // queries in this pass
    reg [31:0] nl;  // lanes in use
    reg [31:0] v0;  // first query vector (query * heads + head) of the pass
    reg [1:0] op;
    reg final_pass;
    reg [SW-1:0] lane_slot[0:LANES-1];
    reg [LANES-1:0] lane_act;
    // counters of the last call, read by the RTL bench (not in the register map)
    reg [31:0] run_cycles;  // ap_start accepted .. ap_done
    reg [31:0] stream_cycles;  // cycles streaming the memory (all passes)
    reg [31:0] select_cycles;  // cycles selecting (all queries)
    reg [31:0] score_rows;  // rows scored (all passes)

    // pass plan, computed in S_PASS
    wire [31:0] left = nq - q0;
    wire [31:0] cand_c = split ? 32'd1 : ((per_pass < left) ? per_pass : left);  // to load
    reg [31:0] run_c;  // leading candidates with the first one's segment
    reg run_on;
    integer r;
    always @(*) begin
        run_c = 32'd1;
        run_on = 1'b1;
        for (r = 1; r < SLOTS; r = r + 1) begin
            if (run_on && r < seg_m && seg_base[r] == seg_base[0] && seg_rows[r] == seg_rows[0])
                run_c = r + 1;
            else run_on = 1'b0;
        end
    end
    wire [31:0] pq_c = split ? 32'd1 : run_c;
    wire [31:0] hrem = nh - hc * LANES;
    wire [31:0] nl_c = split ? ((hrem < LANES) ? hrem : LANES) : pq_c * nh;
    reg [SW-1:0] slot_c[0:LANES-1];
    integer l;
    reg [31:0] cnt_h;
    reg [SW-1:0] cnt_s;
    always @(*) begin
        cnt_h = 0;
        cnt_s = 0;
        for (l = 0; l < LANES; l = l + 1) begin
            slot_c[l] = split ? {SW{1'b0}} : cnt_s;
            cnt_h = cnt_h + 1;
            if (cnt_h == nh) begin
                cnt_h = 0;
                cnt_s = cnt_s + 1'b1;
            end
        end
    end

    // the pre-phase's state (see below)
    reg [511:0] st_lo;  // the row's first chunk
    reg st_aw, st_w;  // the held beat's address / data not yet accepted
    reg st_port;  // 1: port B
    reg [63:0] st_addr;
    reg [511:0] st_data;
    reg [31:0] st_rows;  // rows taken
    reg [31:0] st_out;  // writes whose response is still due

    // -- query port: q vectors, then head weights (token_indexer) or margins (block_gate) ------
    reg  [63:0] rq_addr;
    reg  [31:0] rq_bytes;
    reg  [15:0] rq_rb;
    reg  [31:0] rq_rows;
    always @(*) begin
        case (state)
            S_LW_START, S_LOADW: begin
                rq_addr = w_addr + {v0, 1'b0};
                rq_bytes = {nl[30:0], 1'b0};
                rq_rb = 16'd2;
                rq_rows = nl;
            end
            S_LD_START, S_LOADD: begin
                rq_addr = d_addr + {q0, 2'b0};
                rq_bytes = {pq[29:0], 2'b0};
                rq_rb = 16'd4;
                rq_rows = pq;
            end
            S_CHK_START, S_CHECK: begin  // every segment of the call
                rq_addr = s_addr;
                rq_bytes = {nq[28:0], 3'b0};
                rq_rb = 16'd8;
                rq_rows = nq;
            end
            S_STG_START, S_STAGE: begin  // the staged beats: 68-byte rows
                rq_addr = g_addr;
                rq_bytes = staged * 32'd68;
                rq_rb = 16'd68;
                rq_rows = staged;
            end
            S_SEG_START, S_LOADSEG: begin  // the pass's candidates
                rq_addr = s_addr + {q0, 3'b0};
                rq_bytes = {cand_c[28:0], 3'b0};
                rq_rb = 16'd8;
                rq_rows = cand_c;
            end
            default: begin
                rq_addr = q_addr + v0 * dim;
                rq_bytes = nl * dim;
                rq_rb = dim[15:0];
                rq_rows = nl;
            end
        endcase
    end
    wire        rq_start = state == S_LQ_START || state == S_LW_START || state == S_LD_START ||
                           state == S_CHK_START || state == S_SEG_START || state == S_STG_START;
    wire [31:0] rq_beats = ({26'd0, rq_addr[5:0]} + rq_bytes + 32'd63) >> 6;

    wire [511:0] qr_data, qa_data;
    wire qr_valid, qr_ready, qa_valid, qa_first, qa_last;
    wire qa_ready = state == S_LOADQ || state == S_LOADW || state == S_LOADD ||
                    state == S_CHECK || state == S_LOADSEG ||
                    (state == S_STAGE && (!qa_last || !(st_aw || st_w)));
    // a segment as read: (base, rows), and whether it is invalid for this call
    wire [31:0] qa_base = qa_data[31:0];
    wire [31:0] qa_rows = qa_data[63:32];
    wire qa_seg_bad = qa_rows == 0 || qa_rows > n || (!bitmap && k > qa_rows);

    hm_axi_reader #(
        .DEPTH(16),
        .MAX_BURST(8)
    ) u_rd_query (
        .clk(ap_clk),
        .rst(rst),
        .start(rq_start),
        .addr(rq_addr),
        .beats(rq_beats),
        .busy(),
        .rerr(),
        .m_araddr(m_axi_query_araddr),
        .m_arlen(m_axi_query_arlen),
        .m_arsize(m_axi_query_arsize),
        .m_arburst(m_axi_query_arburst),
        .m_arid(m_axi_query_arid),
        .m_arvalid(m_axi_query_arvalid),
        .m_arready(m_axi_query_arready),
        .m_rdata(m_axi_query_rdata),
        .m_rresp(m_axi_query_rresp),
        .m_rlast(m_axi_query_rlast),
        .m_rid(m_axi_query_rid),
        .m_rvalid(m_axi_query_rvalid),
        .m_rready(m_axi_query_rready),
        .out_data(qr_data),
        .out_valid(qr_valid),
        .out_ready(qr_ready)
    );

    hm_row_aligner u_al_query (
        .clk(ap_clk),
        .rst(rst),
        .start(rq_start),
        .skip(rq_addr[5:0]),
        .row_bytes(rq_rb),
        .rows(rq_rows),
        .done(),
        .in_data(qr_data),
        .in_valid(qr_valid),
        .in_ready(qr_ready),
        .out_data(qa_data),
        .out_valid(qa_valid),
        .out_ready(qa_ready),
        .out_first(qa_first),
        .out_last(qa_last)
    );

    wire qa_fire = qa_valid && qa_ready;
    reg [31:0] ql_row;  // lane (q, w) or slot (delta) being loaded
    reg [31:0] ql_chunk;
    reg [511:0] qmem[0:LANES*QCH-1];
    reg signed [15:0] w_reg[0:LANES-1];
    reg [31:0] delta_reg[0:SLOTS-1];

    // -- the pre-phase: staged beats into the memory ---------------------------------------
    // Each staged beat is a 68-byte row of `stage` on the query port (word 0: bit 31 port B,
    // bits 30..0 the beat index; words 1..16 the beat), cut by the query aligner into two
    // chunks. The beat goes to memory port A or B at (buffer address + index * 64) as one
    // full-strobe single-beat INCR write; writes stay outstanding while the next rows are
    // read, and the pre-phase ends when every write response is in, so the scan that follows
    // reads the staged bytes. Write responses' errors are not reported (like the readers').
    wire st_aw_fire = st_aw && (st_port ? m_axi_mem_b_awready : m_axi_mem_a_awready);
    wire st_w_fire = st_w && (st_port ? m_axi_mem_b_wready : m_axi_mem_a_wready);
    wire st_b_a = m_axi_mem_a_bvalid && m_axi_mem_a_bready;
    wire st_b_b = m_axi_mem_b_bvalid && m_axi_mem_b_bready;
    assign m_axi_mem_a_awaddr = st_addr;
    assign m_axi_mem_a_awlen = 8'd0;
    assign m_axi_mem_a_awsize = 3'd6;
    assign m_axi_mem_a_awburst = 2'b01;
    assign m_axi_mem_a_awid = 1'b0;
    assign m_axi_mem_a_awvalid = st_aw && !st_port;
    assign m_axi_mem_a_wdata = st_data;
    assign m_axi_mem_a_wstrb = {64{1'b1}};
    assign m_axi_mem_a_wlast = 1'b1;
    assign m_axi_mem_a_wvalid = st_w && !st_port;
    assign m_axi_mem_a_bready = 1'b1;
    assign m_axi_mem_b_awaddr = st_addr;
    assign m_axi_mem_b_awlen = 8'd0;
    assign m_axi_mem_b_awsize = 3'd6;
    assign m_axi_mem_b_awburst = 2'b01;
    assign m_axi_mem_b_awid = 1'b0;
    assign m_axi_mem_b_awvalid = st_aw && st_port;
    assign m_axi_mem_b_wdata = st_data;
    assign m_axi_mem_b_wstrb = {64{1'b1}};
    assign m_axi_mem_b_wlast = 1'b1;
    assign m_axi_mem_b_wvalid = st_w && st_port;
    assign m_axi_mem_b_bready = 1'b1;

    always @(posedge ap_clk) begin
        if (rst) begin
            st_aw  <= 1'b0;
            st_w   <= 1'b0;
            st_out <= 32'd0;
        end else begin
            if (state == S_STG_START) st_rows <= 32'd0;
            if (state == S_STAGE && qa_fire) begin
                if (!qa_last) begin
                    st_lo <= qa_data;
                end else begin
                    st_port <= st_lo[31];
                    st_addr <= (st_lo[31] ? b_addr : a_addr) + {27'd0, st_lo[30:0], 6'd0};
                    st_data <= {qa_data[31:0], st_lo[511:32]};
                    st_rows <= st_rows + 1;
                end
            end
            if (state == S_STAGE && qa_fire && qa_last) begin
                st_aw <= 1'b1;
                st_w  <= 1'b1;
            end else begin
                if (st_aw_fire) st_aw <= 1'b0;
                if (st_w_fire) st_w <= 1'b0;
            end
            st_out <= st_out + {31'd0, st_aw_fire} - {31'd0, st_b_a} - {31'd0, st_b_b};
        end
    end
    wire st_done = st_rows == staged && !st_aw && !st_w && st_out == 0;

    // -- memory ports: A (keys / minima) and B (shifts / maxima) -------------------------------
    wire mem_start = state == S_STREAM_START;
    wire [39:0] bytes_a = cur_rows * rb_a;
    wire [39:0] bytes_b = cur_rows * rb_b;
    wire [31:0] beats_a = ({34'd0, a_seg[5:0]} + bytes_a + 40'd63) >> 6;
    wire [31:0] beats_b = ({34'd0, b_seg[5:0]} + bytes_b + 40'd63) >> 6;

    wire [511:0] ra_data, rb_data, a_data, b_data;
    wire ra_valid, ra_ready, rbv, rb_ready;
    wire a_valid, a_first, a_last, b_valid, b_first, b_last;
    wire fire = state == S_STREAM && a_valid && (is_quest ? b_valid : (!a_last || b_valid));
    wire a_ready = fire;
    wire b_ready = is_quest ? fire : (fire && a_last);

    hm_axi_reader #(
        .DEPTH(128),
        .MAX_BURST(64)
    ) u_rd_a (
        .clk(ap_clk),
        .rst(rst),
        .start(mem_start),
        .addr(a_seg),
        .beats(beats_a),
        .busy(),
        .rerr(),
        .m_araddr(m_axi_mem_a_araddr),
        .m_arlen(m_axi_mem_a_arlen),
        .m_arsize(m_axi_mem_a_arsize),
        .m_arburst(m_axi_mem_a_arburst),
        .m_arid(m_axi_mem_a_arid),
        .m_arvalid(m_axi_mem_a_arvalid),
        .m_arready(m_axi_mem_a_arready),
        .m_rdata(m_axi_mem_a_rdata),
        .m_rresp(m_axi_mem_a_rresp),
        .m_rlast(m_axi_mem_a_rlast),
        .m_rid(m_axi_mem_a_rid),
        .m_rvalid(m_axi_mem_a_rvalid),
        .m_rready(m_axi_mem_a_rready),
        .out_data(ra_data),
        .out_valid(ra_valid),
        .out_ready(ra_ready)
    );

    hm_row_aligner u_al_a (
        .clk(ap_clk),
        .rst(rst),
        .start(mem_start),
        .skip(a_seg[5:0]),
        .row_bytes(rb_a[15:0]),
        .rows(cur_rows),
        .done(),
        .in_data(ra_data),
        .in_valid(ra_valid),
        .in_ready(ra_ready),
        .out_data(a_data),
        .out_valid(a_valid),
        .out_ready(a_ready),
        .out_first(a_first),
        .out_last(a_last)
    );

    hm_axi_reader #(
        .DEPTH(128),
        .MAX_BURST(64)
    ) u_rd_b (
        .clk(ap_clk),
        .rst(rst),
        .start(mem_start),
        .addr(b_seg),
        .beats(beats_b),
        .busy(),
        .rerr(),
        .m_araddr(m_axi_mem_b_araddr),
        .m_arlen(m_axi_mem_b_arlen),
        .m_arsize(m_axi_mem_b_arsize),
        .m_arburst(m_axi_mem_b_arburst),
        .m_arid(m_axi_mem_b_arid),
        .m_arvalid(m_axi_mem_b_arvalid),
        .m_arready(m_axi_mem_b_arready),
        .m_rdata(m_axi_mem_b_rdata),
        .m_rresp(m_axi_mem_b_rresp),
        .m_rlast(m_axi_mem_b_rlast),
        .m_rid(m_axi_mem_b_rid),
        .m_rvalid(m_axi_mem_b_rvalid),
        .m_rready(m_axi_mem_b_rready),
        .out_data(rb_data),
        .out_valid(rbv),
        .out_ready(rb_ready)
    );

    hm_row_aligner u_al_b (
        .clk(ap_clk),
        .rst(rst),
        .start(mem_start),
        .skip(b_seg[5:0]),
        .row_bytes(rb_b[15:0]),
        .rows(cur_rows),
        .done(),
        .in_data(rb_data),
        .in_valid(rbv),
        .in_ready(rb_ready),
        .out_data(b_data),
        .out_valid(b_valid),
        .out_ready(b_ready),
        .out_first(b_first),
        .out_last(b_last)
    );

    // -- lanes -------------------------------------------------------------------------------
    reg [31:0] jc;  // chunk of the row
    wire [31:0] qidx = is_quest ? (jc >> 1) : jc;
    wire qhalf = is_quest && jc[0];
    wire [LANES-1:0] lane_valid;
    wire [LANES*48-1:0] lane_dot;

    genvar gl;
    generate
        for (gl = 0; gl < LANES; gl = gl + 1) begin : g_lane
            wire [511:0] qbeat = qmem[gl*QCH+qidx[$clog2(QCH+1)-1:0]];
            hm_lane #(
                .ACC_W(48)
            ) u_lane (
                .clk(ap_clk),
                .rst(rst),
                .quest(is_quest),
                .in_valid(fire),
                .in_first(a_first),
                .in_last(a_last),
                .in_a(a_data),
                .in_b(b_data),
                .in_q(qhalf ? {256'd0, qbeat[511:256]} : qbeat),
                .out_valid(lane_valid[gl]),
                .out_dot(lane_dot[48*gl+:48])
            );
        end
    endgenerate

    // row shift, delayed to meet the lanes' result
    reg [7:0] shift_p1, shift_p2;
    always @(posedge ap_clk) begin
        shift_p1 <= is_quest ? 8'd0 : b_data[7:0];
        shift_p2 <= shift_p1;
    end

    // -- score assembly per slot (in the clocked block: once per row) -----------------------
    reg in_valid;
    reg [SLOTS*64-1:0] in_scores;
    reg [SLOTS-1:0] slot_mask;
    reg [31:0] rows_done;
    // Per lane: its value (w * ReLU(dot) for the token indexer, else the dot), or the
    // reduction's identity where the lane is idle.
    wire [LANES*64-1:0] lane_val;
    genvar gv;
    generate
        for (gv = 0; gv < LANES; gv = gv + 1) begin : g_val
            wire signed [47:0] d = lane_dot[48*gv+:48];
            wire signed [63:0] wv = $signed({1'b0, d[47] ? 47'd0 : d[46:0]}) * w_reg[gv];
            assign lane_val[64*gv+:64] = !lane_act[gv] ? (is_quest ? MIN64 : 64'd0) :
                is_tok ? wv : {{16{d[47]}}, d};
        end
    endgenerate

    // A query's lanes are contiguous (a slot's lanes, then the next slot's), so one segmented
    // prefix scan over the lanes (sum, or max for Quest) leaves each slot's total in its last
    // lane: log2(LANES) levels instead of a reduction per slot over every lane.
    localparam LL = (LANES > 1) ? $clog2(LANES) : 1;
    reg [LANES*64-1:0] scan;
    reg [63:0] sa, sb;
    reg [LANES-1:0] lane_end;
    integer lv, ls;
    always @(*) begin
        sa = 64'd0;
        sb = 64'd0;
        scan = lane_val;
        for (lv = 0; lv < LL; lv = lv + 1)
            for (ls = LANES - 1; ls >= (1 << lv); ls = ls - 1)
                if (lane_slot[ls-(1<<lv)] == lane_slot[ls]) begin
                    sa = scan[64*ls+:64];
                    sb = scan[64*(ls-(1<<lv))+:64];
                    scan[64*ls+:64] = is_quest ? (($signed(sb) > $signed(sa)) ? sb : sa) : sa + sb;
                end
        // a slot's last ACTIVE lane: idle lanes hold the identity and never end a slot (with
        // more lanes than 2^SW x heads their slot ids wrap onto an active slot's)
        lane_end = {LANES{1'b0}};
        for (ls = 0; ls < LANES; ls = ls + 1)
            lane_end[ls] = lane_act[ls] && ((ls == LANES - 1) || !lane_act[(ls+1)%LANES] ||
                (lane_slot[(ls+1)%LANES] != lane_slot[ls]));
    end

    reg [63:0] sacc;
    integer s2, l2;
    always @(posedge ap_clk) begin
        in_valid <= !rst && state == S_STREAM && lane_valid[0];
        if (lane_valid[0]) begin
            for (s2 = 0; s2 < SLOTS; s2 = s2 + 1) begin
                sacc = 64'd0;  // a slot's last lane (a slot without lanes is masked off)
                for (l2 = 0; l2 < LANES; l2 = l2 + 1)
                    sacc = sacc | (scan[64*l2+:64] & {64{lane_end[l2] && lane_slot[l2] == s2[SW-1:0]}});
                in_scores[64*s2+:64] <= is_quest ? sacc : (sacc << shift_p2);
            end
        end
    end

    // -- retrieval -----------------------------------------------------------------------------
    reg [31:0] sel_slot;  // slot being selected (wider than SW: it counts past the last)
    wire cmd_ready, cmd_done, topk_idle;
    wire [511:0] sel_data;
    wire [4:0] sel_items;
    wire sel_valid, sel_ready;

    hm_topk #(
        .SLOTS(SLOTS),
        .NMAX(NMAX),
        .W(SCAN)
    ) u_topk (
        .clk(ap_clk),
        .rst(rst),
        .clear(mem_start),
        .in_valid(in_valid),
        .in_idx(rows_done[XW-1:0]),
        .in_mask(slot_mask),
        .in_scores(in_scores),
        .in_op(op),
        .in_final(final_pass),
        .cmd_valid(state == S_SELECT && sel_slot < pq),
        .cmd_ready(cmd_ready),
        .cmd_slot(sel_slot[SW-1:0]),
        .cmd_n(cur_rows[XW:0]),
        .cmd_nout(n[XW:0]),
        .cmd_k(k[XW:0]),
        .cmd_bitmap(bitmap),
        .cmd_delta(delta_reg[sel_slot[SW-1:0]]),
        .cmd_done(cmd_done),
        .flush(state == S_FLUSH),
        .idle(topk_idle),
        .out_data(sel_data),
        .out_items(sel_items),
        .out_valid(sel_valid),
        .out_ready(sel_ready)
    );

    wire writer_idle;
    hm_axi_writer #(
        .DEPTH(32),
        .MAX_BURST(16)
    ) u_wr_out (
        .clk(ap_clk),
        .rst(rst),
        .start(state == S_SETUP),
        .addr(o_addr),
        .last(state == S_FLUSH && topk_idle),
        .idle(writer_idle),
        .berr(),
        .in_data(sel_data),
        .in_items(sel_items),
        .in_valid(sel_valid),
        .in_ready(sel_ready),
        .m_awaddr(m_axi_out_awaddr),
        .m_awlen(m_axi_out_awlen),
        .m_awsize(m_axi_out_awsize),
        .m_awburst(m_axi_out_awburst),
        .m_awid(m_axi_out_awid),
        .m_awvalid(m_axi_out_awvalid),
        .m_awready(m_axi_out_awready),
        .m_wdata(m_axi_out_wdata),
        .m_wstrb(m_axi_out_wstrb),
        .m_wlast(m_axi_out_wlast),
        .m_wvalid(m_axi_out_wvalid),
        .m_wready(m_axi_out_wready),
        .m_bresp(m_axi_out_bresp),
        .m_bid(m_axi_out_bid),
        .m_bvalid(m_axi_out_bvalid),
        .m_bready(m_axi_out_bready)
    );

    // -- the call ----------------------------------------------------------------------------
    integer i;
    always @(posedge ap_clk) begin
        if (rst) begin
            state <= S_IDLE;
            run_cycles <= 0;
        end else begin
            if (state != S_IDLE) run_cycles <= run_cycles + 1;
            if (state == S_STREAM) stream_cycles <= stream_cycles + 1;
            if (state == S_SELECT || state == S_SELECT_WAIT) select_cycles <= select_cycles + 1;
            if (in_valid) score_rows <= score_rows + 1;
            case (state)
                S_IDLE:
                if (start) begin
                    kern <= kernel;
                    a_addr <= buffers[0*64+:64];
                    b_addr <= buffers[1*64+:64];
                    q_addr <= buffers[2*64+:64];
                    w_addr <= buffers[3*64+:64];
                    d_addr <= buffers[4*64+:64];
                    o_addr <= buffers[5*64+:64];
                    s_addr <= buffers[6*64+:64];
                    g_addr <= buffers[7*64+:64];
                    n <= scalars[0*32+:32];
                    k <= scalars[1*32+:32];
                    nq <= scalars[2*32+:32];
                    heads <= scalars[3*32+:32];
                    dim <= scalars[4*32+:32];
                    mode <= (kernel == 2'd3) ? scalars[5*32+:32] : 32'd0;
                    staged <= scalars[6*32+:32];
                    run_cycles <= 1;
                    stream_cycles <= 0;
                    select_cycles <= 0;
                    score_rows <= 0;
                    state <= S_SETUP;
                end
                S_SETUP: begin
                    per_pass <= (per_pass_c < SLOTS) ? per_pass_c : SLOTS;
                    q0 <= 0;
                    hc <= 0;
                    ql_row <= 0;
                    seg_bad <= 1'b0;
                    state <= bad ? S_DONE : S_CHK_START;
                end
                S_CHK_START: state <= S_CHECK;
                S_CHECK:
                if (qa_fire) begin
                    if (qa_seg_bad) seg_bad <= 1'b1;
                    ql_row <= ql_row + 1;
                    if (ql_row + 1 == nq)
                        state <= (seg_bad || qa_seg_bad) ? S_DONE :
                                 (staged != 0) ? S_STG_START : S_SEG_START;
                end
                S_STG_START: state <= S_STAGE;
                S_STAGE: if (st_done) state <= S_SEG_START;
                S_SEG_START: begin
                    ql_row <= 0;
                    seg_m <= cand_c;
                    state <= S_LOADSEG;
                end
                S_LOADSEG:
                if (qa_fire) begin
                    seg_base[ql_row[SW-1:0]] <= qa_base;
                    seg_rows[ql_row[SW-1:0]] <= qa_rows;
                    ql_row <= ql_row + 1;
                    if (ql_row + 1 == seg_m) state <= S_PASS;
                end
                S_PASS: begin
                    pq <= pq_c;
                    cur_base <= seg_base[0];
                    cur_rows <= seg_rows[0];
                    a_seg <= a_addr + seg_base[0] * rb_a;
                    b_seg <= b_addr + seg_base[0] * rb_b;
                    nl <= nl_c;
                    v0 <= q0 * nh + hc * LANES;
                    op <= (split && hc != 0) ? (is_quest ? OP_MAX : OP_ADD) : OP_WRITE;
                    final_pass <= !split || (hc + 1) * LANES >= nh;
                    for (i = 0; i < LANES; i = i + 1) begin
                        lane_slot[i] <= slot_c[i];
                        lane_act[i]  <= i < nl_c;
                    end
                    for (i = 0; i < SLOTS; i = i + 1) slot_mask[i] <= i < pq_c;
                    ql_row <= 0;
                    ql_chunk <= 0;
                    state <= S_LQ_START;
                end
                S_LQ_START: state <= S_LOADQ;
                S_LOADQ:
                if (qa_fire) begin
                    qmem[ql_row*QCH+ql_chunk] <= qa_data;
                    if (qa_last) begin
                        ql_chunk <= 0;
                        ql_row <= ql_row + 1;
                        if (ql_row + 1 == nl)
                            state <= is_tok ? S_LW_START : (bitmap ? S_LD_START : S_STREAM_START);
                    end else begin
                        ql_chunk <= ql_chunk + 1;
                    end
                end
                S_LW_START: begin
                    ql_row <= 0;
                    state <= S_LOADW;
                end
                S_LOADW:
                if (qa_fire) begin
                    w_reg[ql_row] <= qa_data[15:0];
                    ql_row <= ql_row + 1;
                    if (ql_row + 1 == nl) state <= S_STREAM_START;
                end
                S_LD_START: begin
                    ql_row <= 0;
                    state <= S_LOADD;
                end
                S_LOADD:
                if (qa_fire) begin
                    delta_reg[ql_row] <= qa_data[31:0];
                    ql_row <= ql_row + 1;
                    if (ql_row + 1 == pq) state <= S_STREAM_START;
                end
                S_STREAM_START: begin
                    jc <= 0;
                    rows_done <= 0;
                    state <= S_STREAM;
                end
                S_STREAM: begin
                    if (fire) jc <= a_last ? 32'd0 : jc + 1;
                    if (in_valid) begin
                        rows_done <= rows_done + 1;
                        if (rows_done + 1 == cur_rows) begin
                            sel_slot <= 0;
                            state <= final_pass ? S_SELECT : S_NEXT;
                        end
                    end
                end
                S_SELECT:
                if (sel_slot >= pq) state <= S_NEXT;
                else if (cmd_ready) state <= S_SELECT_WAIT;
                S_SELECT_WAIT:
                if (cmd_done) begin
                    sel_slot <= sel_slot + 1;
                    state <= S_SELECT;
                end
                S_NEXT: begin
                    if (split) begin
                        if ((hc + 1) * LANES >= nh) begin
                            hc <= 0;
                            q0 <= q0 + 1;
                            state <= (q0 + 1 < nq) ? S_SEG_START : S_FLUSH;
                        end else begin
                            hc <= hc + 1;
                            state <= S_PASS;  // the same query: its segment is loaded
                        end
                    end else begin
                        q0 <= q0 + pq;
                        state <= (q0 + pq < nq) ? S_SEG_START : S_FLUSH;
                    end
                end
                S_FLUSH: if (topk_idle && writer_idle) state <= S_DONE;
                S_DONE: state <= S_IDLE;
                default: state <= S_IDLE;
            endcase
        end
    end
endmodule

`default_nettype wire
